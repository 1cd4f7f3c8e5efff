"""A job's progress on the terminal: a bar for the job and one for the image being diffused, moving per tile-step,
an ETA from the throughput measured so far, and each failure on its own line as it happens.

Work is counted in tile-forwards (`pipeline.progress.forwards`), estimated per input before it runs from its
header's size and the tile plan, so a large image weighs what it costs. In the local loop the diffusion stage
reports every network call; on Ray Data (other processes) a row's work counts when the row comes back. Without a
terminal (k8s logs, CI) one line every 30 s, and one at the end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from functools import wraps

from jobs.config import enters
from pipeline import progress

LOG_EVERY_S = 30.0
RATE_WINDOW = 6  # reports the ETA's throughput is measured over
STEP_GAP_S = 0.02  # a tile-step redraws the bar unless one was drawn this recently (a GPU reports hundreds a second)


HEADER_ROWS = 256  # rows whose image headers are read to weigh them; later rows weigh the mean of these


class Weigher:
    """Each planned row's work in tile-forwards, as the rows stream in: from its image header (the first 64 KiB)
    and the tile plan for the first HEADER_ROWS rows, the mean of those for the rest; 1 each when rows come back
    whole (Ray Data: `headers=False`), for latents and prompts (their size is not known before they run), and for a
    row whose header cannot be read."""

    def __init__(self, cfg, plan, headers: bool = True):
        self.cfg, self.plan, self.read = cfg, plan, headers and enters(cfg) == "images"
        self.seen, self.sum = 0, 0
        self.preset = None
        if self.read:
            try:
                self.preset = cfg.flow.preset
            except Exception:
                self.read = False

    def __call__(self, row: dict) -> int:
        if not self.read:
            return 1
        if self.seen >= HEADER_ROWS:
            return max(1, round(self.sum / self.seen))
        from pipeline.imageio import probe
        from pipeline.stages.common import sampler_steps
        from pipeline.stages.encode import plan_for

        work = 1
        try:
            o = row.get("opts") or self.cfg.options
            hw = probe(self.plan.src.read(row.get("src_key") or row["key"], 1 << 16), max_pixels=1 << 62)
            tiles = plan_for(self.preset, o, hw).n_tiles
            work = progress.forwards(tiles, sampler_steps(self.preset, o), self.preset.sampler == "guided")
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

    def __init__(self, work: dict[str, int] | None, stream, enabled: bool = True, name: str = "upscale"):
        self.work, self.stream, self.enabled, self.name = dict(work or {}), stream, enabled, name
        self.total = sum(self.work.values())
        self.images = len(self.work)
        self.partial: dict[str, int] = {}  # key -> tile-forwards done, for rows not back yet
        self.finished = 0  # tile-forwards of rows that are back
        self.rows_done = 0
        self.current = ""  # the image the last report was about
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t_first: float | None = None  # when work was first seen: the rate leaves model loading out
        self.done_at_first = 0
        self.marks: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)  # (time, work done) at recent reports
        self.last_draw = 0.0
        self.last_log = time.time()
        self.drawn = 0  # lines of the bars now on the terminal
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ events
    def listen(self):
        return progress.listening(self.on_forwards)

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
        self.current = key
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
        the rate counts only the work reported after it. Each report is kept among the last RATE_WINDOW ones."""
        now, done = time.time(), self.done
        if self.t_first is None and done > 0:
            self.t_first, self.done_at_first = now, done
        if self.t_first is not None and (not self.marks or self.marks[-1][1] != done):
            self.marks.append((now, done))

    def eta(self) -> float:
        """Seconds left at the throughput of the last reports (the machine's speed may change under a job: a shared
        node), NaN before two reports tell it."""
        if len(self.marks) < 2:
            return float("nan")
        (t0, d0), d1 = self.marks[0], self.marks[-1][1]
        rate = (d1 - d0) / max(1e-9, time.time() - t0) if d1 > d0 else 0.0
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    # ------------------------------------------------------------------ drawing
    def _tick(self, force: bool = False, min_gap: float = 0.1) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.tty and (force or now - self.last_draw >= min_gap):
            self._draw()
        elif not self.tty and now - self.last_log >= LOG_EVERY_S:
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
        self.drawn, self.last_draw = len(lines), time.time()

    def _log(self) -> None:
        self.last_log = time.time()
        pct = 100 * self.done / self.total if self.total else 100.0
        print(f"{self.name}: {self.rows_done}/{self.images} images ({pct:.0f}% of the work), ETA {_clock(self.eta())}",
              file=self.stream, flush=True)  # fmt: skip
