"""Running a dataset job (`jobs.datasets`: the flags, the listing, each shard's fate): the driver.

The driver lists SRC's shards or tables, settles what becomes of each (`settle`: to do, kept by --resume, refused),
writes the manifest and holds DST's lease; each shard to do runs as a `jobs.dataset_shard.Shard`: its samples stream
from its reader through the workflow's stages into its writer, which assembles the output shard or table in input
order (results that come early wait on local disk) and publishes it whole under its final name (never over a file,
unless --overwrite replaces a proven earlier output of pidray). Where the shards run:

- the local loop (here): one shard after the other in this process, through `StageGraph.run_local` (a few samples
  in flight at a time);
- --ray (`jobs.dataset_ray`): several shards at once, each read, assembled and published by a Ray actor on a worker,
  their samples through the same actor pools as a job over files; the driver sees only small rows.

Each published shard leaves a receipt and a row of its own in the manifest (key: the shard's name, with the proof
that this job wrote it); its samples' rows (`shard.tar#key`, `table.parquet#row`) reach the manifest once it is
published. A job stopped mid-shard (Ctrl-C, SIGTERM) publishes nothing of that shard, records its samples as
interrupted and removes its temporary; `--resume` skips the shards that were published and does the others again.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from jobs.config import Summary
from jobs.dataset_shard import Context, Shard
from jobs.datasets import DatasetJob, Outputs, check_tables, list_shards, refuse, settle, source
from jobs.lease import Fenced, Lease, holding
from jobs.loop import Interrupted, Signals, on_signals
from jobs.manifest import MANIFEST_NAME, manifest_row, set_aside
from jobs.manifest_writer import ManifestWriter
from jobs.preflight import preflight
from jobs.previous import PreviousIndex, has_manifest
from jobs.settings import run_metadata
from jobs.terminal import _warn
from pipeline import receipts
from pipeline.errors import SetupError
from pipeline.storage import Location, display

FLUSH_EVERY_S = 15.0


def run_dataset_job(cfg, ds: DatasetJob, on_row=None) -> Summary:
    """The job over SRC's shards or tables; the summary. A dry run lists what would be done, writing nothing."""
    t0 = time.time()
    refuse(cfg)
    preflight(cfg)
    root, shards, other = list_shards(cfg, ds)
    if ds.format == "parquet":
        check_tables(root, shards, ds, cfg.follow_symlinks, cfg.s3)
    if cfg.dry_run:
        return _dry_run(cfg, shards, other, on_row)
    return holding(Location(cfg.dst, cfg.s3), lambda lease: _Run(cfg, ds, lease, root, t0).run(shards, other))


def _dry_run(cfg, shards: list[str], other: list[str], on_row) -> Summary:
    summary = Summary()
    dst = Location(cfg.dst, cfg.s3)
    outputs = Outputs(dst, PreviousIndex.load(dst) if has_manifest(dst) else _NoRows())
    for rel in shards[: cfg.limit] if cfg.limit else shards:
        kind, got = settle(cfg, outputs, rel)
        status = {"todo": "planned", "replace": "planned", "skipped": "skipped"}.get(kind, "failed")
        error = (got or {}).get("error", "") if kind == "rejected" else ""
        if kind == "earlier":
            error = "an earlier pidray run wrote its output: --resume keeps it, --overwrite does it again"
        row = {"key": display(rel), "status": status, "output_key": display(rel), "error": error}
        summary.count(row)
        if on_row:
            on_row(row)
    for rel in other if on_row else ():
        on_row({"key": display(rel), "status": "skipped", "error": "not a shard or table of the dataset"})
    return summary


class _NoRows:
    rows: dict = {}
    problem = ""


def on_ray(cfg) -> bool:
    """--ray runs the shards on Ray, --local in this process; neither: Ray where a cluster is configured."""
    return cfg.local is False or (cfg.local is None and bool(os.environ.get("RAY_ADDRESS")))


class _Run(Context):
    """The driver of a dataset job, and the context of its shards when they run in this process."""

    def __init__(self, cfg, ds: DatasetJob, lease: Lease, root: str, t0: float):
        self.cfg, self.ds, self.lease, self.t0 = cfg, ds, lease, t0
        self.src = source(root, cfg.follow_symlinks, cfg.s3)  # where its shards are read from
        self.dst = Location(cfg.dst, cfg.s3)
        if not self.dst.is_s3:  # absolute: a Ray worker may not share this process's folder
            self.dst = Location(os.path.abspath(cfg.dst), cfg.s3)
        self.dst.tag = lease.owner  # its temporaries carry the job's id: it removes only its own
        self.summary = Summary(runner="local loop")
        self.summary.failures_shown = True
        self.preset = cfg.model.preset
        self.graph = None
        self.stages = None  # built when the first shard is done: a job with nothing to do loads no model
        self.signals = Signals()
        self.out = sys.stderr  # what the job says (under Ray: the terminal, Ray's own notices going to its log)

    # ------------------------------------------------------------------------------------------------ the job
    def run(self, shards: list[str], other: list[str]) -> Summary:
        cfg, dst, lease = self.cfg, self.dst, self.lease
        if lease.took_over:
            n = dst.remove_temporaries(lease.taken_over) if lease.taken_over else 0
            _warn(f"took over DST's lease, which was stale ({lease.took_over}); removed {n} temporary file(s) of "
                  "the job that held it")  # fmt: skip
        self.previous = PreviousIndex.load(dst) if (cfg.resume or cfg.overwrite or has_manifest(dst)) else None
        try:
            return self._run(shards, other)
        finally:
            if self.previous is not None:
                self.previous.close()

    def _run(self, shards: list[str], other: list[str]) -> Summary:
        cfg, dst = self.cfg, self.dst
        previous = self.previous or _NoRows()
        if previous.problem:
            kept = set_aside(dst, previous)
            _warn(
                f"the manifest {dst.uri.rstrip('/')}/{MANIFEST_NAME} does not fit ({previous.problem}): it is kept "
                f"as {kept}; a shard's output is kept by --resume only where its receipt proves pidray wrote it"
            )
        outputs = Outputs(dst, previous)
        fates = [(rel, *settle(cfg, outputs, rel)) for rel in (shards[: cfg.limit] if cfg.limit else shards)]
        earlier = [rel for rel, kind, _ in fates if kind == "earlier"]
        if earlier:  # before any model loads, as a job over files says it
            more = "" if len(earlier) == 1 else f" and {len(earlier) - 1} more"
            raise SetupError(f"DST {cfg.dst} already holds this job's outputs from an earlier pidray run "
                             f"({display(earlier[0])}{more}): add --resume to keep them and do only what is missing, "
                             "or --overwrite to do them again")  # fmt: skip
        self.writer = ManifestWriter(Fenced(dst, self.lease), tag=self.lease.owner, every_s=FLUSH_EVERY_S,
                                     meta=run_metadata(cfg, self.t0))  # fmt: skip
        for rel in other:
            self._record({"key": rel, "status": "skipped", "error": "not a shard or table of the dataset",
                          "error_kind": "skipped"})  # fmt: skip
        todo = []  # (shard, replace, the S3 version replaced)
        for rel, kind, got in fates:
            if kind in ("todo", "replace"):
                found = outputs.found(rel) if kind == "replace" else None
                todo.append((rel, found is not None, found.etag if found is not None else ""))
            else:
                self._settled(rel, kind, got)
        whole = cfg.limit is None
        with on_signals(self.signals):
            try:
                if todo and on_ray(cfg):
                    from jobs.dataset_ray import run_on_ray

                    run_on_ray(self, todo)
                else:
                    for rel, replace, etag in todo:
                        self.lease.check()
                        self._shard(rel, replace, etag)
            except Interrupted as e:
                self.summary.interrupted = e.signum
                whole = False
            finally:
                self.signals.stopping = True
                with on_signals(signal.SIG_IGN):  # a second Ctrl-C must not cut the manifest short
                    self._close(whole)
        return self.summary

    def _close(self, whole: bool) -> None:
        touched = self.previous
        for r in touched.untouched() if touched is not None else ():  # rows of shards this run did not do
            self.writer.add(r)
        self.summary.seconds = time.time() - self.t0
        self.summary.manifest = self.writer.close()
        self.dst.remove_temporaries(self.dst.tag)  # this job's own, never another job's
        if self.summary.manifest == f"{self.dst.uri.rstrip('/')}/{MANIFEST_NAME}":  # its rows carry the proofs
            receipts.remove(self.dst, None if whole and not self.summary.interrupted else self.dst.tag)

    def _record(self, row: dict, count: bool = True) -> None:
        m = manifest_row(row, self.preset)
        if self.previous is not None:
            self.previous.touch(row["key"])
        self.writer.add(m)
        if self.writer.due():
            self.writer.flush()
        if count:
            self.summary.count(m)
            if m["status"] == "failed":
                self._say(f"failed  {m['key']}: {m['error']}")

    def _say(self, text: str) -> None:
        if self.cfg.progress or text.startswith("failed"):
            print(text, file=self.out, flush=True)

    def _settled(self, rel: str, kind: str, got: dict | None) -> None:
        """A shard whose fate was decided from DST: refused, or kept by --resume."""
        if kind == "rejected":
            self._record({"key": rel, "status": "failed", **got})
            return
        self.summary.skipped += 1
        self.summary.already += 1
        self._say(f"skipped {display(rel)}: done by an earlier run (kept by --resume)")
        if self.previous is None or self.previous.rows.get(rel) is None:  # proven by its receipt only
            lost = "DST's manifest had no row for it (its run was cut off): its samples' rows are not in the manifest"
            self._record({"key": rel, "status": "ok", "output_key": rel, "notes": ["done by an earlier run", lost],
                          **got}, count=False)  # fmt: skip

    # ------------------------------------------------------------------------------------------------ in this process
    def _shard(self, rel: str, replace: bool, etag: str) -> None:
        if self.stages is None:
            from pipeline.graph import StageGraph

            self.graph = StageGraph(workflow=self.cfg.flow)
            self.stages = self.graph.build_all()
        Shard(self, rel, replace, etag).run()

    # the context of a shard run here (jobs.dataset_shard.Context)
    def through(self, rows):
        return self.graph.run_local(rows, stages=self.stages)

    def hold(self):
        return self.signals.hold()

    def record(self, row: dict, count: bool = True) -> None:
        self._record(row, count)

    def say(self, text: str) -> None:
        self._say(text)
