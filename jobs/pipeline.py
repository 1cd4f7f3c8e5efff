"""The bulk job's driver: plan → (local loop | Ray Data) → manifest, as a stream from end to end.

The planner lists SRC one folder at a time and hands rows on as it goes; at most MAX_IN_FLIGHT rows are between the
planner and the results (backpressure), so the driver's memory does not grow with the job. Result rows are counted
(`Summary`) and forwarded to the manifest, which grows by parts (`jobs.manifest_writer.ManifestWriter`): a finished row
reaches DST's manifest within FLUSH_EVERY_S. Stage adapters for Ray Data: `jobs.raydata`; the checks before any
model loads: `jobs.preflight`; the terminal: `jobs.terminal`; how a job stops, and the in-process loop's thread:
`jobs.loop`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

from jobs.config import KEEP_ROWS, JobConfig, Summary
from jobs.lease import Fenced, Lease, LeaseLost, holding
from jobs.loop import Interrupted, Loop, Signals, on_signals, read_ahead, stop_ray, taken
from jobs.manifest import MANIFEST_NAME, manifest_row, set_aside
from jobs.manifest_writer import FileManifest, ManifestWriter
from jobs.plan import Plan, output_candidates, plan_job
from jobs.preflight import preflight
from jobs.progress import JobProgress, Weigher
from jobs.raydata import StageActor, _ensure_ray, _iter_ray, stage_task
from jobs.settings import run_metadata
from jobs.terminal import _RayQuiet, _warn
from pipeline import receipts
from pipeline.errors import SetupError, storage_failures
from pipeline.storage import Location, display

MAX_IN_FLIGHT = 4096  # planned rows not yet back from the stages (far above the rows a stage batches: 16)
FLUSH_EVERY_S = 15.0  # a finished row is in DST's manifest this long after the driver hears of it, at most


def run_job(cfg: JobConfig, on_row=None) -> Summary:
    """Run the job; returns the summary. The manifest (Parquet) is written at DST whatever happens once planned.
    on_row: called with each finished stage row (a dry run: with each planned manifest row, as it is planned).

    A job holds DST's lease from before planning to after its manifest (a dry run writes nothing and takes none):
    a DST in use by another live job is refused up front."""
    t0 = time.time()
    preflight(cfg)
    if cfg.dry_run:
        return _run(cfg, None, on_row, t0)
    return holding(Location(cfg.dst, cfg.s3), lambda lease: _run(cfg, lease, on_row, t0))


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
            except storage_failures() as e:
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
    loop: Loop | None = None  # the in-process loop's thread, once it runs
    signals = Signals()

    def take(row: dict) -> None:
        if not job.finished(row):
            return  # a row Ray ran twice (a lost block rebuilt): recorded once
        if feeds:
            feeds[0].done(row["key"])
        job.bar.row_done(row)
        if on_row:
            on_row(row)

    with on_signals(signals):
        try:
            with quiet, job.bar.listen():
                if not local:
                    _ensure_ray()  # start Ray before our handlers matter: its start-up installs handlers of its own
                if local:  # the planner runs ahead of the loop (as the feed thread does for Ray Data)
                    loop = Loop(cfg, plan, read_ahead(job.todo(), job.stopped), take)
                    rows = loop.rows(signals.hold)
                else:
                    rows = taken(_iter_ray(cfg, plan, job.todo(), feeds), take, signals.hold)
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
                with on_signals(signal.SIG_IGN):
                    stop_ray()  # the job's tasks and actors end with it: no output lands after DST is looked at
            job.bar.close()
            with on_signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the manifest short
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
            except storage_failures():  # DST not listable now: say nothing about outputs
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
