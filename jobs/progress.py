"""A job's progress on the terminal: a bar for the job and one for the image being diffused, moving per tile-step,
a smoothed ETA from the throughput measured, and each failure on its own line as it happens.

Work is counted in tile-forwards (`pipeline.progress.forwards`), estimated per input before it runs from its
header's size and the tile plan, so a large image weighs what it costs. In the local loop the diffusion stage
reports every network call; on Ray Data (other processes) a row's work counts when the row comes back. Without a
terminal (k8s logs, CI) one line every 30 s (PIDRAY_LOG_EVERY_S), even while one network call runs for minutes, and
one at the end.

The ETA divides the work left by a smoothed throughput: each stretch between two reports counts at its own rate,
weighted by how long it lasted and how recent it is (an exponential window of TAU_S seconds, or TAU_REPORTS of the
usual gaps between reports when they are far apart), and the throughput shown moves by at most STEP_LIMIT per
report. A steady job's ETA counts down without jumping; a machine that really slows down or speeds up is followed
within a few windows.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from functools import wraps

from pipeline import progress

LOG_EVERY_S = 30.0  # without a terminal: a progress line at least this often (PIDRAY_LOG_EVERY_S)
LOG_ENV = "PIDRAY_LOG_EVERY_S"
TAU_S = 60.0  # the ETA's throughput is averaged over about this long...
TAU_REPORTS = 8  # ...or over this many of the usual gaps between reports, when that is longer
STEP_LIMIT = 1.2  # the throughput the ETA uses changes by at most this factor (or its inverse) per report
BURST_S = 0.01  # reports this close together are one report (a network call over several images reports each)
STEP_GAP_S = 0.02  # a tile-step redraws the bar unless one was drawn this recently (a GPU reports hundreds a second)


HEADER_ROWS = 256  # rows whose image headers are read to weigh them; later rows weigh the mean of these


class Weigher:
    """Each planned row's work in tile-forwards, as the rows stream in: from its image header (the first 64 KiB)
    and the tile plan for the first HEADER_ROWS rows, the mean of those for the rest; 1 each when rows come back
    whole (Ray Data: `headers=False`), for latents and prompts (their size is not known before they run), and for a
    row whose header cannot be read."""

    def __init__(self, cfg, plan, headers: bool = True):
        self.cfg, self.plan, self.read = cfg, plan, headers and cfg.flow.reads_images
        self.seen, self.sum = 0, 0
        self.preset = cfg.flow.preset if self.read else None

    def __call__(self, row: dict) -> int:
        if not self.read:
            return 1
        if self.seen >= HEADER_ROWS:
            return max(1, round(self.sum / self.seen))
        from pipeline.imageio import probe
        from pipeline.stages.encode import plan_for

        work = 1
        try:
            o = self.cfg.flow.enter(row)["opts"]  # the options it will run with (the driver enters it so too)
            hw = probe(self.plan.src.read(row.get("src_key") or row["key"], 1 << 16), max_pixels=1 << 62)
            tiles = plan_for(self.preset, o, hw).n_tiles
            work = progress.forwards(tiles, o.steps, self.preset.sampling.guided)
        except Exception:  # unknown here: the row still counts, as one unit
            pass
        self.seen, self.sum = self.seen + 1, self.sum + work
        return work


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds < 0:  # NaN: not measured yet
        return "?"
    if seconds < 1:  # the last moments: writing the outputs and the manifest are not in the measured work
        return "<1s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def log_every() -> float:
    """Seconds between progress lines without a terminal: PIDRAY_LOG_EVERY_S when it is a positive number."""
    try:
        every = float(os.environ.get(LOG_ENV, LOG_EVERY_S))
    except ValueError:
        return LOG_EVERY_S
    return every if 0 < every < math.inf else LOG_EVERY_S


class Throughput:
    """Work per second, averaged over the recent past, from (time, work done) reports.

    Each stretch between two reports has its own rate (its work over its duration); the average weighs each by its
    duration and by exp(-age / tau), so a report that brings a lot of work at once after a long call counts as the
    steady work it was, not as a burst. Before tau has passed it is the plain mean since the first report."""

    def __init__(self, tau: float = TAU_S, reports: int = TAU_REPORTS):
        self.tau0, self.reports = tau, reports
        self.work = 0.0  # decayed sum of each stretch's rate x its decayed duration
        self.time = 0.0  # decayed sum of the stretches' durations
        self.gap = 0.0  # the usual gap between reports (those further apart than BURST_S)
        self.t0 = 0.0
        self.t: float | None = None  # the last report's time, and the work done then
        self.done = 0.0

    @property
    def tau(self) -> float:
        return max(self.tau0, self.reports * self.gap)

    def start(self, t: float, done: float) -> None:
        self.t0 = self.t = t
        self.done = done

    def add(self, t: float, done: float) -> None:
        """Work `done` in all at time `t`."""
        if self.t is None:
            self.start(t, done)
            return
        dt, dw = t - self.t, done - self.done
        if not self.time and t - self.t0 <= BURST_S:  # the first call's other images: ran before the clock started
            self.t, self.done = t, done
            return
        if dt <= 0:  # the same instant: the stretch that ended there gets the work
            self.work += dw
            self.done = done
            return
        if dt > BURST_S:
            self.gap = dt if not self.gap else self.gap + 0.25 * (dt - self.gap)
        decay = math.exp(-dt / self.tau)
        mass = self.tau * -math.expm1(-dt / self.tau)  # this stretch's weight: its duration, decayed
        self.work = self.work * decay + dw / dt * mass
        self.time = self.time * decay + mass
        self.t, self.done = t, done

    def rate(self) -> float:
        return self.work / self.time if self.time > 0 else float("nan")


def _bar(fraction: float, width: int) -> str:
    full = int(round(max(0.0, min(1.0, fraction)) * width))
    return "#" * full + "-" * (width - full)


def _locked(method):
    """The bars are told things from the planner's thread (rows planned, refusals) and the driver's (results)."""

    @wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return run


class JobProgress:
    """The job's bars. `row_done(row)` for every row that comes back; the diffusion stage's reports arrive through
    `pipeline.progress.listening(self.on_forwards)` (see `listen`)."""

    def __init__(
        self,
        work: dict[str, int] | None,
        stream,
        enabled: bool = True,
        name: str = "upscale",
        steps: bool = False,
        clock=None,
    ):
        self.work, self.stream, self.enabled, self.name = dict(work or {}), stream, enabled, name
        self.clock = clock or time.monotonic
        self.total = sum(self.work.values())
        self.images = len(self.work)
        self.partial: dict[str, int] = {}  # key -> tile-forwards done, for rows not back yet
        self.finished = 0  # tile-forwards of rows that are back
        self.rows_done = 0
        self.current = ""  # the image the last report was about
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t_first: float | None = None  # when work was first seen: the rate leaves model loading out
        self.throughput = Throughput()
        self.rate_shown = float("nan")  # the throughput the ETA uses: the measured one, moving STEP_LIMIT at most
        self.base_rate = float("nan")  # the one shown before the latest burst of reports (what STEP_LIMIT bounds)
        self.t_base = self.t_shown = -math.inf  # when base_rate and rate_shown were last set
        self.steps = steps  # the diffusion stage reports here (the local loop): lines can say tile-steps
        self.rows_logged = 0  # images finished at the last line without a terminal
        self.last_draw = 0.0
        self.every = log_every()
        self.last_log = self.clock()
        self.drawn = 0  # lines of the bars now on the terminal
        self.lock = threading.RLock()
        self.closed = threading.Event()

    # ------------------------------------------------------------------ events
    @contextmanager
    def listen(self):
        """Hear the diffusion stage's reports inside the block; without a terminal, also a line every `every`
        seconds from a timer, so that a job whose network calls last minutes still says how far it is."""
        if self.enabled and not self.tty:
            threading.Thread(target=self._timer, name="pidray-progress", daemon=True).start()
        try:
            with progress.listening(self.on_forwards):
                yield
        finally:
            self.closed.set()

    def _timer(self) -> None:
        while not self.closed.wait(min(1.0, self.every / 4)):
            with self.lock:
                if not self.closed.is_set() and self.images and self.clock() - self.last_log >= self.every:
                    self._log(timer=True)

    @_locked
    def add(self, key: str, work: int) -> None:
        """A row planned while the job runs (SRC is listed as it goes): the totals grow."""
        if key not in self.work:
            self.work[key] = work
            self.total += work
            self.images += 1

    @_locked
    def on_forwards(self, key: str, n: int) -> None:
        if key not in self.work:
            return
        self.partial[key] = min(self.work[key], self.partial.get(key, 0) + n)
        self.current, self.steps = key, True
        self._started()
        self._tick(force=self.partial[key] == self.work[key], min_gap=STEP_GAP_S)  # an image's last step is shown

    @_locked
    def row_done(self, row: dict) -> None:
        key = row["key"]
        self.partial.pop(key, None)
        self.finished += self.work.pop(key, 0)  # only rows in flight are held: the driver's memory stays flat
        self.rows_done += 1
        self._started()
        if row.get("status") == "failed":
            self.say(f"failed  {row['key']}: {row.get('error', '')}")
        for warning in row.get("warnings") or ():  # a silent change made to an output (also in its notes)
            self.say(f"note    {row['key']}: {warning}")
        self._tick(force=self.rows_done == self.images)

    @_locked
    def say(self, line: str) -> None:
        """A line above the bars (a failure as it happens), or on its own without a terminal."""
        self._clear()
        print(line, file=self.stream, flush=True)
        self._draw()

    @_locked
    def close(self) -> None:
        self.closed.set()
        if self.tty:
            self._draw()
            if self.drawn:
                print(file=self.stream, flush=True)
            self.drawn = 0
        elif self.enabled and self.rows_done:
            self._log()

    # ------------------------------------------------------------------ figures
    @property
    def done(self) -> int:
        return self.finished + sum(self.partial.values())

    def _started(self) -> None:
        """The clock starts at the first report: the work it reports ran before it (with the model's warm-up), so
        the rate counts only the work reported after it. Each report that moves the work on updates the throughput
        and the rate the ETA uses."""
        now, done = self.clock(), self.done
        if self.t_first is None:
            if done > 0:
                self.t_first = now
                self.throughput.start(now, done)
            return
        if done == self.throughput.done:
            return
        tp = self.throughput
        tp.add(now, done)
        measured = tp.rate()
        if not measured > 0 or tp.time <= BURST_S:  # one call's reports alone tell no throughput
            return
        if now - self.t_base > BURST_S:  # a new report, not one more of the same call's: it may move the rate
            self.base_rate, self.t_base = self.rate_shown, now
        base = self.base_rate
        self.rate_shown = measured if not base > 0 else min(base * STEP_LIMIT, max(base / STEP_LIMIT, measured))
        self.t_shown = now

    def eta(self) -> float:
        """Seconds left at the smoothed throughput (the machine's speed may change under a job: a shared node), NaN
        before two reports tell it. Between reports it counts down, for at most the usual gap between them (a
        call that runs longer than usual does not bring it to zero)."""
        if not self.rate_shown > 0:
            return float("nan")
        since = max(0.0, self.clock() - self.t_shown)
        return max(0.0, (self.total - self.done) / self.rate_shown - min(since, self.throughput.gap))

    # ------------------------------------------------------------------ drawing
    def _tick(self, force: bool = False, min_gap: float = 0.1) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self.tty and (force or now - self.last_draw >= min_gap):
            self._draw()
        elif not self.tty and now - self.last_log >= self.every:
            self._log()

    def _lines(self) -> list[str]:
        pct = self.done / self.total if self.total else 1.0
        job = (f"{self.name} [{_bar(pct, 30)}] {100 * pct:3.0f}%  {self.rows_done}/{self.images} images  "
               f"ETA {_clock(self.eta())}")  # fmt: skip
        key = self.current
        if not key or key not in self.partial:
            return [job]
        w = self.work[key]
        return [job, f"  {key[-40:]} [{_bar(self.partial[key] / w, 20)}] {self.partial[key]}/{w} tile-steps"]

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\x1b[2K\r" + "\x1b[1A\x1b[2K\r" * (self.drawn - 1))
            self.drawn = 0

    def _draw(self) -> None:
        if not self.tty:
            return
        self._clear()
        lines = self._lines()
        self.stream.write("\n".join(lines))
        self.stream.flush()
        self.drawn, self.last_draw = len(lines), self.clock()

    def _log(self, timer: bool = False) -> None:
        """The line without a terminal. From the timer, when no image finished since the last line, it also says the
        tile-steps done on the image being diffused (a large one may take minutes)."""
        self.last_log = self.clock()
        pct = 100 * self.done / self.total if self.total else 100.0
        line = f"{self.name}: {self.rows_done}/{self.images} images ({pct:.0f}% of the work), ETA {_clock(self.eta())}"
        if timer and self.steps and self.rows_done == self.rows_logged:
            key = self.current
            if key in self.partial:
                line += f"; {key[-40:]}: {self.partial[key]}/{self.work[key]} tile-steps"
            else:
                n = sum(self.partial.values())
                line += f"; {n} tile-steps done on the images in progress" if n else "; no tile-step finished yet"
        self.rows_logged = self.rows_done
        print(line, file=self.stream, flush=True)
