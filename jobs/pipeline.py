"""The bulk job's driver: plan → (local loop | Ray Data) → manifest, as a stream from end to end.

The planner lists SRC one folder at a time and hands rows on as it goes; at most MAX_IN_FLIGHT rows are between the
planner and the results (backpressure), so the driver's memory does not grow with the job. Result rows are counted
(`Summary`) and forwarded to the manifest, which grows by parts (`jobs.manifest.ManifestWriter`): a finished row
reaches DST's manifest within FLUSH_EVERY_S. Stage adapters for Ray Data: `jobs.raydata`; the checks before any
model loads: `jobs.preflight`; the terminal: `jobs.terminal`.
"""

from __future__ import annotations

import atexit
import copy
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from jobs.config import KEEP_ROWS, JobConfig, Summary
from jobs.lease import Fenced, Lease, LeaseLost
from jobs.manifest import MANIFEST_NAME, FileManifest, ManifestWriter, manifest_row, set_aside
from jobs.plan import Plan, output_candidates, plan_job
from jobs.preflight import preflight
from jobs.progress import JobProgress, Weigher
from jobs.raydata import StageActor, _ensure_ray, _iter_local, _iter_ray, stage_task
from jobs.settings import run_metadata
from jobs.terminal import _RayQuiet, _warn, quiet_ray_data_threads
from pipeline import progress, receipts
from pipeline.errors import SetupError
from pipeline.storage import Location, display

MAX_IN_FLIGHT = 4096  # planned rows not yet back from the stages (far above the rows a stage batches: 16)
FLUSH_EVERY_S = 15.0  # a finished row is in DST's manifest this long after the driver hears of it, at most


class Interrupted(BaseException):
    """SIGINT/SIGTERM during a job: the job stops, writes its manifest, and exits 128 + signal.

    A BaseException, like KeyboardInterrupt, so that no per-row `except Exception` records it as a failed input.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """The job's SIGINT/SIGTERM handler. The first signal stops the job: Interrupted is raised in the main thread at
    once, or, while the driver records a finished row (`hold`), right after it (a row is recorded whole). Once the
    job is stopping (`stopping`), a signal changes nothing: the manifest is written whole."""

    def __init__(self):
        self.signum = 0
        self.holding = False
        self.stopping = False

    def __call__(self, signum, frame):
        self.signum = self.signum or signum
        if not (self.stopping or self.holding):
            raise Interrupted(signum)

    @contextmanager
    def hold(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.signum and not self.stopping:
            raise Interrupted(self.signum)


@contextmanager
def _on_signals(handler):
    """SIGINT/SIGTERM go to `handler` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_job(cfg: JobConfig, on_row=None) -> Summary:
    """Run the job; returns the summary. The manifest (Parquet) is written at DST whatever happens once planned.
    on_row: called with each finished stage row (a dry run: with each planned manifest row, as it is planned).

    A job holds DST's lease from before planning to after its manifest (a dry run writes nothing and takes none):
    a DST in use by another live job is refused up front."""
    t0 = time.time()
    preflight(cfg)
    if cfg.dry_run:
        return _run(cfg, None, on_row, t0)
    lease = Lease(Location(cfg.dst, cfg.s3))
    lease.acquire()
    try:
        lease.start_heartbeat()
        return _run(cfg, lease, on_row, t0)
    finally:
        lease.release()


def _run(cfg: JobConfig, lease: Lease | None, on_row, t0: float) -> Summary:
    plan = plan_job(cfg)
    try:
        return _run_plan(cfg, plan, lease, on_row, t0)
    finally:
        close = getattr(plan.previous, "close", None)
        if close:
            close()


def _run_plan(cfg: JobConfig, plan: Plan, lease: Lease | None, on_row, t0: float) -> Summary:
    if lease is not None:
        # its temporaries carry the job's id: it removes only its own; the write stage reads DST's lease for this id
        # before each output it publishes, and stops writing once another job holds it
        plan.dst.tag = lease.owner
        if lease.took_over:  # only a lease that names a job id has temporaries to remove, and only with that id
            n = plan.dst.remove_temporaries(lease.taken_over) if lease.taken_over else 0
            _warn(f"took over DST's lease from {f'job {lease.taken_over}' if lease.taken_over else 'a lease file'}, "
                  f"which was stale ({lease.took_over})"
                  + (f"; removed its {n} unfinished temporary file(s)" if n else ""))  # fmt: skip
    if plan.previous.problem and not (cfg.output_name and plan.single is not None):  # a file job leaves it be
        where = f"{plan.dst.uri.rstrip('/')}/{MANIFEST_NAME}"
        kept = "it would be kept beside it as a backup"
        if not cfg.dry_run:
            try:
                kept = f"it is kept as {set_aside(plan.dst, plan.previous)}"
            except Exception as e:
                kept = f"it could not be kept as a backup ({type(e).__name__}: {e})"
        prev = plan.previous
        what = ("the rows of the part(s) that cannot be used were" if getattr(prev, "bad", None)
                else "its rows were" if prev.set_aside < 0 else f"{prev.set_aside} row(s) were")  # fmt: skip
        _warn(f"the manifest {where} does not fit ({prev.problem}): {what} set aside and {kept}; every other row is "
              "kept, and a new manifest is written (an output no kept row records is kept by --resume only where "
              "its receipt proves a pidray job wrote it)")  # fmt: skip
    if cfg.dry_run:
        return _dry_run(cfg, plan, on_row)
    meta = run_metadata(cfg, t0)  # the settings, pidray's version and the start, in every part's Parquet metadata
    # a leased job publishes each manifest file only while DST's lease is still its own (Fenced)
    if cfg.output_name and plan.single is not None:  # one file to one named file: only that file is written
        writer = FileManifest(cfg.manifest, meta=meta)
    else:
        writer = ManifestWriter(Fenced(plan.dst, lease) if lease else plan.dst, tag=lease.owner if lease else "",
                                every_s=FLUSH_EVERY_S, meta=meta)  # fmt: skip
    job = _Job(cfg, plan, writer)
    summary = job.summary
    local = use_local_loop(cfg, job.peek_small())
    if not (cfg.resume or cfg.overwrite):  # before any model loads: DST holds this job's outputs from an earlier run
        earlier = [r for kind, r in job.ahead if kind == "rejected" and r.get("written_by")]
        named = [r for kind, r in job.ahead if kind == "rejected" and r.get("error_kind") == "exists"]
        if cfg.output_name and plan.single is not None and named:  # the one file DST names is there
            name = f"{plan.dst.uri.rstrip('/')}/{display(cfg.output_name)}.{cfg.options.format}"
            raise SetupError(f"{name} exists: --overwrite replaces it, --resume keeps it, or name another file")
        if earlier:
            many = "" if len(earlier) == 1 else f" and {len(earlier) - 1} more"
            raise SetupError(
                f"DST {cfg.dst} already holds this job's outputs from an earlier pidray run ({earlier[0]['key']} -> "
                f"{earlier[0]['output_key']}{many}): add --resume to keep them and do only what is missing, or "
                "--overwrite to do them again"
            )
    summary.runner = "local loop" if local else "Ray Data"
    quiet = _RayQuiet(enabled=not local and not cfg.verbose)
    # the tile-step bars: in the local loop the diffusion stage reports each network call, so rows are weighed
    # from their headers; under Ray Data a row counts when it comes back, so each weighs one
    job.bar = JobProgress(None, quiet.terminal, cfg.progress, name=cfg.workflow, steps=local)
    job.weigh = Weigher(cfg, plan, headers=local)
    summary.failures_shown = True  # failures are said as they happen (at planning, or as rows come back)
    flusher = threading.Thread(target=job.flush_loop, name="pidray-manifest", daemon=True)
    flusher.start()
    feeds: list = []  # the Ray Data feed, once it runs
    loop: _Loop | None = None  # the in-process loop's thread, once it runs
    signals = _Signals()

    def take(row: dict) -> None:
        if not job.finished(row):
            return  # a row Ray ran twice (a lost block rebuilt): recorded once
        if feeds:
            feeds[0].done(row["key"])
        job.bar.row_done(row)
        if on_row:
            on_row(row)

    with _on_signals(signals):
        try:
            with quiet, job.bar.listen():
                if not local:
                    _ensure_ray()  # start Ray before our handlers matter: its start-up installs handlers of its own
                if local:  # the planner runs ahead of the loop (as the feed thread does for Ray Data)
                    loop = _Loop(cfg, plan, _read_ahead(job.todo(), job.stopped), take)
                    rows = loop.rows(signals.hold)
                else:
                    rows = _taken(_iter_ray(cfg, plan, job.todo(), feeds), take, signals.hold)
                for row in rows:
                    if lease is not None:
                        lease.check()  # never two jobs writing one DST: stop if another job took the lease
        except Interrupted as e:
            signals.stopping = True  # a second Ctrl-C from here on changes nothing
            summary.interrupted = e.signum
            for row in loop.ready() if loop else ():  # done already: recorded as done
                take(row)
            job.bar.say(f"stopping: finishing nothing, recording {len(job.pending)} interrupted")
            for row in loop.halt() if loop else ():  # outputs that were being written as the signal came
                take(row)
        except LeaseLost:
            pass  # said below, once the manifest is written (never into DST): where it went
        finally:
            signals.stopping = True
            if loop is not None:
                loop.finish(signals)
            job.stop()
            for feed in feeds:  # before Ray goes: the feed's thread must not call into a stopped Ray
                feed.stop()
            if (summary.interrupted or (lease is not None and lease.lost)) and not local:
                with _on_signals(signal.SIG_IGN):
                    _stop_ray()  # the job's tasks and actors end with it: no output lands after DST is looked at
            job.bar.close()
            with _on_signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the manifest short
                summary.seconds = time.time() - t0
                summary.manifest = job.close(look=True)
                plan.dst.remove_temporaries(plan.dst.tag)  # this job's own, never another job's
                if isinstance(job.writer, FileManifest):  # the output's name was given: no receipt is kept beside it
                    receipts.remove(plan.dst, plan.dst.tag)
                elif summary.manifest == f"{plan.dst.uri.rstrip('/')}/{MANIFEST_NAME}":  # the rows carry the proof
                    whole = not summary.interrupted and cfg.limit is None and not (lease is not None and lease.lost)
                    receipts.remove(plan.dst, None if whole and job.planned_all else plan.dst.tag)
    if lease is not None and lease.lost:  # another job holds DST now: this job stopped writing there
        raise LeaseLost(f"stopped: {lease.lost}, so this job wrote nothing more into DST; its manifest is at "
                        f"{summary.manifest}", said=True)  # fmt: skip
    return summary


def _stop_ray() -> None:
    import ray

    if ray.is_initialized():
        quiet_ray_data_threads()
        ray.shutdown()


def _read_ahead(items: Iterable[dict], stopped: threading.Event) -> Iterator[dict]:
    """`items`, drawn by a thread of its own as fast as it gives them (its own backpressure bounds it)."""
    q: queue.Queue = queue.Queue()
    end = object()

    def pull():
        try:
            for item in items:
                q.put(item)
        except BaseException as e:  # the planner failed: raised in the caller's thread
            q.put(("error", e))
        finally:
            q.put(end)

    threading.Thread(target=pull, name="pidray-plan", daemon=True).start()
    while not stopped.is_set():
        item = q.get()
        if item is end:
            return
        if isinstance(item, tuple):
            raise item[1]
        yield item


def _taken(rows: Iterable[dict], take, hold) -> Iterator[dict]:
    """`rows`, each recorded by `take` inside `hold()` (a signal that comes meanwhile is answered once it is)."""
    for row in rows:
        with hold():
            take(row)
        yield row


class _Halted(BaseException):
    """Raised in the loop's thread once the job stops: it stops there (no stage records it as a failed row)."""


class _Gate:
    """DST as the in-process loop's write stage sees it: once closed, no output starts being written (`_Halted`).
    Counts the writes under way (`busy`) and keeps the outputs written whose rows the driver has not taken yet
    (`unreported`)."""

    def __init__(self, dst: Location):
        self._dst, self._lock = dst, threading.Lock()
        self.closed, self.busy, self.unreported = False, 0, set()

    def __getattr__(self, name):
        return getattr(self._dst, name)

    def write(self, key: str, data: bytes, **kwargs) -> None:
        with self._lock:
            if self.closed:
                raise _Halted
            self.busy += 1
        try:
            self._dst.write(key, data, **kwargs)
            with self._lock:
                self.unreported.add(key)
        finally:
            with self._lock:
                self.busy -= 1

    def close(self) -> None:
        with self._lock:
            self.closed = True

    def reported(self, key: str) -> None:
        with self._lock:
            self.unreported.discard(key)


STOP_GRACE_S = 2.0  # after Ctrl-C, how long the driver waits for an output being written (its row is then `ok`)


class _Loop:
    """The in-process loop (`_iter_local`) in a thread of its own, its finished rows handed to the driver through a
    queue. The main thread only waits on the queue, so a signal is answered at once: Python runs signal handlers in
    the main thread, between its own steps, never inside a network call that lasts minutes.

    `halt()` stops it: no output starts being written after it (`_Gate`), the diffusion stage stops at its next
    network call, and the rows whose outputs were being written are handed over. The thread is a daemon: a network
    call under way when the job stops ends with the process."""

    END = object()

    def __init__(self, cfg: JobConfig, plan: Plan, rows: Iterable[dict], take):
        self.take = take  # records a finished row (in the main thread)
        self.queue: queue.Queue = queue.Queue()
        self.gate = _Gate(plan.dst)
        gated = copy.copy(plan)
        gated.dst = self.gate
        self.it = _iter_local(cfg, gated, rows)
        self.halted = threading.Event()
        self.ended = False
        self.thread = threading.Thread(target=self._run, name="pidray-loop", daemon=True)

    def _run(self) -> None:
        try:
            with progress.listening(self._check):
                for row in self.it:
                    self.queue.put(row)
                    if self.halted.is_set():
                        return
        except _Halted:
            pass
        except BaseException as e:  # the loop failed (the model could not load...): raised in the driver
            self.queue.put(_Failed(e))
        finally:
            self.queue.put(self.END)

    def _check(self, key: str, n: int) -> None:
        """Heard after each network call: the loop's thread stops there once halted."""
        if self.halted.is_set() and threading.current_thread() is self.thread:
            raise _Halted

    def _next(self, timeout: float | None, failure: bool = True):
        """The next row, None when none came within `timeout` or the loop ended; a failure in the loop is raised
        (unless not `failure`: the job is stopping anyway)."""
        if self.ended:
            return None
        try:
            item = self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        if item is self.END:
            self.ended = True
            return None
        if isinstance(item, _Failed):
            self.ended = True
            if failure:
                raise item.error
            return None
        if item.get("output_key"):
            self.gate.reported(item["output_key"])
        return item

    def rows(self, hold) -> Iterator[dict]:
        """The finished rows, each taken by `take` inside `hold()` (the signal handler's: a signal is answered once the
        row is recorded, or once the wait ends, half a second at most; the main thread stays free for the handler)."""
        self.thread.start()
        while not self.ended:
            with hold():
                row = self._next(timeout=0.5)
                if row is not None:
                    self.take(row)
            if row is not None:
                yield row

    def ready(self) -> list[dict]:
        """The rows already handed over and not taken yet."""
        out = []
        while (row := self._next(timeout=0, failure=False)) is not None:
            out.append(row)
        return out

    def halt(self, grace: float = STOP_GRACE_S) -> list[dict]:
        """Stop the loop; the rows whose outputs were being written (waited for `grace` seconds at most)."""
        self.halted.set()
        self.gate.close()
        out = self.ready()
        deadline = time.monotonic() + grace
        while not self.ended and (self.gate.busy or self.gate.unreported):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            row = self._next(timeout=min(left, 0.1), failure=False)
            if row is not None:
                out.append(row)
        return out

    def finish(self, signals: _Signals) -> None:
        """The thread ends with the job: at its next network call or output when an error stopped the job (said
        once it has), at once after a signal. Python cannot end a thread inside a network call, and one that comes
        back from it while the interpreter exits aborts the process; so after a signal, at the interpreter's exit,
        the process exits with the signal's code (128 + signal) there and then if the thread is still inside one."""
        self.halt(grace=0)
        while self.thread.is_alive() and not signals.signum:
            self.thread.join(0.25)
        if self.thread.is_alive():
            atexit.register(self._leave, 128 + signals.signum)

    def _leave(self, code: int) -> None:
        if self.thread.is_alive():
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _dry_run(cfg: JobConfig, plan: Plan, on_row) -> Summary:
    """Every planned row as it is planned: to do (`planned`, with its output name), skipped, refused."""
    summary = Summary()
    n = 0
    for kind, r in plan.items():
        if kind == "todo":
            if cfg.limit is not None and n >= cfg.limit:
                break
            n += 1
            r = {**manifest_row(r, cfg.model.preset), "status": "planned",
                 "output_key": display(r["output_stem"]) + ".*"}  # fmt: skip
        summary.count(r, already=kind == "skipped" and r["status"] == "ok")
        if on_row:
            on_row(r)
    return summary


class _Job:
    """A running job's state in the driver: the rows in flight (planned, not back yet; at most MAX_IN_FLIGHT), the
    counters, the manifest writer. `todo()` runs the planner (in the feed's planner thread under Ray Data, in a
    read-ahead thread locally); `finished` takes each result in the main thread; `close` writes the manifest's last
    part."""

    def __init__(self, cfg: JobConfig, plan: Plan, writer: ManifestWriter):
        self.cfg, self.plan, self.writer = cfg, plan, writer
        self.summary = Summary()
        self.pending: dict[str, dict] = {}
        self.room = threading.Semaphore(MAX_IN_FLIGHT)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.items = plan.items()
        self.ahead: list[tuple[str, dict]] = []  # items looked at before the run started (peek_small)
        self.bar: JobProgress | None = None
        self.weigh = None  # a planned row -> its work (jobs.progress.Weigher)
        self.planned_all = False

    def peek_small(self) -> int:
        """How many inputs the job has to do, up to AUTO_LOCAL_MAX + 1 (which runner suits it)."""
        todo = 0
        for kind, row in self.items:
            self.ahead.append((kind, row))
            todo += kind == "todo"
            if todo > AUTO_LOCAL_MAX:
                break
        limit = self.cfg.limit
        return todo if limit is None else min(todo, limit)

    def _all_items(self):
        yield from self.ahead
        self.ahead = []
        yield from self.items

    def todo(self) -> Iterator[dict]:
        """The rows to do, as planned; skipped and refused rows go straight to the manifest."""
        n, preset, previous = 0, self.cfg.model.preset, self.plan.previous
        touch = getattr(previous, "touch", None)
        for kind, row in self._all_items():
            if self.stopped.is_set():
                return
            if kind == "todo" and self.cfg.limit is not None and n >= self.cfg.limit:
                return
            if kind == "todo":
                n += 1
                while not self.room.acquire(timeout=0.5):
                    if self.stopped.is_set():
                        return
                if self.bar is not None:  # weighed outside the lock: it may read the image's header
                    self.bar.add(row["key"], self.weigh(row) if self.weigh else 1)
            with self.lock:
                if self.stopped.is_set():
                    return
                if touch:
                    touch(row["key"])
                if kind == "todo":
                    self.pending[row["key"]] = row
                else:
                    row = manifest_row(row, preset)
                    self.writer.add(row)
                    self.summary.count(row, already=kind == "skipped" and row["status"] == "ok")
                    if row["status"] == "failed" and self.bar is not None:  # refused at planning: said now
                        self.bar.say(f"failed  {row['key']}: {row['error']}")
            if kind == "todo":
                yield row
        self.planned_all = True  # every input of SRC was planned (none left by --limit or a stop)

    def finished(self, row: dict) -> bool:
        with self.lock:
            if self.pending.pop(row["key"], None) is None:
                return False
            self.room.release()
            m = manifest_row(row, self.cfg.model.preset)
            if m["status"] == "ok" and m["output_key"]:
                m["written_by"] = self.plan.dst.tag  # the proof that this job wrote it (jobs.manifest.proof)
            self.writer.add(m)
            self.summary.count(m)
        return True

    def flush_loop(self) -> None:
        while not self.stopped.wait(1.0):
            with self.lock:
                if self.writer.due() and not self.stopped.is_set():
                    self.writer.flush()

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()

    def close(self, look: bool) -> str:
        """The manifest's last rows: the inputs still in flight (`interrupted`), the earlier manifest's rows this
        job did not plan again (carried over), then the last part."""
        with self.lock:
            left = list(self.pending.values())
            self.pending = {}
            for r in _unfinished(self.cfg, self.plan, left, look=look).values():
                self.writer.add(r)
                self.summary.rows.append(r) if len(self.summary.rows) < KEEP_ROWS else None
            untouched = getattr(self.plan.previous, "untouched", None)
            for r in untouched() if untouched else self.plan.previous.rows.values():
                self.writer.add(r)
            return self.writer.close()


def _unfinished(cfg: JobConfig, plan: Plan, rows: list[dict], look: bool = True) -> dict[str, dict]:
    """Manifest rows for inputs the job has not reported: `interrupted`, and (when `look`) whether an output landed.

    A worker may have written an output (atomically: it is complete) that the driver had not heard of yet.
    """
    listings: dict[str, dict] = {}
    out = {}
    job = plan.dst.tag
    mine = {k: size for k, (by, size) in receipts.read(plan.dst).items() if by == job} if look and rows else {}
    for r in rows:
        folder = r["output_stem"].rpartition("/")[0]
        if look and folder not in listings:
            try:
                listings[folder] = plan.dst.files(folder)
            except Exception:  # DST not listable now: say nothing about outputs
                listings[folder] = {}
        existing = listings.get(folder, {})
        outs = output_candidates(r["output_stem"], cfg.options.format, r.get("theirs", ()))
        # an output this job's write stage published and receipted, not yet reported to the driver
        hit = next((c for c in outs if c in existing and _receipted(plan.dst, c, existing[c], mine, job)), "")
        error = ("interrupted after its output was written (complete; --resume keeps it)" if hit
                 else "interrupted before it finished; --resume does it" if look
                 else "not finished when this manifest was written; --resume does it if the job stops")  # fmt: skip
        out[r["key"]] = manifest_row({**r, "status": "interrupted", "error": error}, cfg.model.preset)
        out[r["key"]]["output_key"] = display(hit)
        if hit:
            out[r["key"]].update(written_by=job, out_bytes=existing[hit].size)
    return out


def _receipted(dst: Location, key: str, found, mine: dict[str, int], job: str) -> bool:
    """Whether `key` in DST is this job's own output, by its receipt (pipeline/receipts.py)."""
    if not found.regular:
        return False
    if dst.is_s3:
        return bool(job) and receipts.s3_job(dst, key) == job
    return mine.get(key) == found.size


AUTO_LOCAL_MAX = 16  # inputs: below this, with no cluster configured, Ray's start-up costs more than it saves


def use_local_loop(cfg: JobConfig, n: int) -> bool:
    """--local / --ray decide; otherwise the in-process loop for small jobs when no cluster is configured."""
    if cfg.local is not None:
        return cfg.local
    return not os.environ.get("RAY_ADDRESS") and n <= AUTO_LOCAL_MAX


__all__ = ["JobConfig", "Summary", "run_job", "plan_job", "preflight", "MANIFEST_NAME", "StageActor", "stage_task"]
