"""Running a dataset job (`jobs.datasets`: the flags, the listing, each shard's fate) in this process.

Shards are done one after the other. A shard's samples stream from its reader through the workflow's stages (the
same stage graph as a job over files, `StageGraph.run_local`: a few samples in flight at a time) into its writer,
which assembles the output shard or table in input order (results that come early wait on local disk) and publishes
it whole under its final name (a temporary in the same folder, then a link: never over a file, unless --overwrite
replaces a proven earlier output of pidray). Each published shard leaves a receipt and a row of its own in the
manifest (key: the shard's name, with the proof that this job wrote it); its samples' rows (`shard.tar#key`,
`table.parquet#row`) reach the manifest once it is published. A job stopped mid-shard (Ctrl-C, SIGTERM) publishes
nothing of that shard, records its samples as interrupted and removes its temporary; `--resume` skips the shards
that were published and does the others again.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import sys
import tempfile
import time

from jobs.config import Summary
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
from pipeline.errors import BadInput, SetupError, kind_of
from pipeline.noise import file_seed
from pipeline.storage import Location, check_lease, display

FLUSH_EVERY_S = 15.0
INTERRUPTED = "interrupted before its shard was published; --resume does the shard again"


def run_dataset_job(cfg, ds: DatasetJob, on_row=None) -> Summary:
    """The job over SRC's shards or tables; the summary. A dry run lists what would be done, writing nothing."""
    t0 = time.time()
    refuse(cfg)
    preflight(cfg)
    root, shards, other = list_shards(cfg, ds)
    if ds.format == "parquet":
        check_tables(root, shards, ds, cfg.follow_symlinks)
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


class _Run:
    def __init__(self, cfg, ds: DatasetJob, lease: Lease, root: str, t0: float):
        self.cfg, self.ds, self.lease, self.t0 = cfg, ds, lease, t0
        self.src = source(root, cfg.follow_symlinks)  # where its shards are read from
        self.dst = Location(cfg.dst, cfg.s3)
        self.dst.tag = lease.owner  # its temporaries carry the job's id: it removes only its own
        self.summary = Summary(runner="local loop")
        self.summary.failures_shown = True
        self.preset = cfg.model.preset
        self.graph = None
        self.stages = None  # built when the first shard is done: a job with nothing to do loads no model
        self.signals = Signals()

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
        whole = cfg.limit is None
        with on_signals(self.signals):
            try:
                for rel, kind, got in fates:
                    self.lease.check()
                    self._shard(rel, kind, got)
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
            print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------ one shard
    def _shard(self, rel: str, kind: str, got: dict | None) -> None:
        if kind == "rejected":
            self._record({"key": rel, "status": "failed", **got})
            return
        if kind == "skipped":
            self.summary.skipped += 1
            self.summary.already += 1
            self._say(f"skipped {display(rel)}: done by an earlier run (kept by --resume)")
            if self.previous is None or self.previous.rows.get(rel) is None:  # proven by its receipt only
                self._record({"key": rel, "status": "ok", "output_key": rel, "notes": ["done by an earlier run"],
                              **got}, count=False)  # fmt: skip
            return
        if self.stages is None:
            from pipeline.graph import StageGraph

            self.graph = StageGraph(workflow=self.cfg.flow)
            self.stages = self.graph.build_all()
        shard = _Shard(self, rel, replace=kind == "replace")
        shard.run()


class _Shard:
    """One shard or table: read → stages → writer, its sample rows kept on local disk until it is published."""

    def __init__(self, job: _Run, rel: str, replace: bool):
        self.job, self.rel, self.replace = job, rel, replace
        self.done = _Spill()  # finished sample rows, recorded once the shard is published
        self.inflight: dict[str, object] = {}  # sample id -> what its writer needs back (bounded by the stages)
        self.writer = None
        self.nothing = False  # the input could not be read at all: nothing is published
        self.published = False

    def run(self) -> None:
        job, ds = self.job, self.job.ds
        folder, _, name = self.rel.rpartition("/")
        out_folder = os.path.join(job.dst.uri, folder)
        signals = job.signals
        try:
            with job.src.open(self.rel) as f:
                if ds.format == "webdataset":
                    from pipeline.datasets import ShardReader, ShardWriter

                    reader = ShardReader(f, self.rel, ds.image_key, ds.caption_key)
                    self.writer = ShardWriter(out_folder, name, tag=job.dst.tag, replace=self.replace)
                    rows = self._samples(reader)
                else:
                    from pipeline.datasets import TableReader, TableWriter

                    reader = TableReader(f, self.rel, ds.image_column, ds.caption_column)
                    self.writer = TableWriter(out_folder, name, reader.schema, tag=job.dst.tag, replace=self.replace)
                    self.chunks: dict[int, list] = {}
                    rows = self._rows_of_chunks(reader)
                for row in job.graph.run_local(rows, stages=job.stages):
                    with signals.hold():
                        self._finished(row)
                with signals.hold():
                    self._publish()
        except Interrupted:
            if not self.published:
                self._abort(INTERRUPTED, "interrupted")
            raise
        except Exception as e:  # the shard cannot be read or written (a name, a full disk): its samples fail
            self._abort(f"its shard failed: {e}", "failed", e)

    # ---------------------------------------------------------------- in
    def _sample_row(self, s) -> dict:
        cfg = self.job.cfg
        row = {"key": s.id, "bytes": s.image, "in_bytes": len(s.image), "seed": file_seed(cfg.options.seed, s.id)}
        caption = s.caption if s.caption else cfg.options.caption
        if s.caption:
            row["caption"] = s.caption  # the sample's own, over --caption
        return {**row, "used_caption": caption or ""}

    def _failed_sample(self, s) -> None:
        if s.broken and s.id == self.rel:  # not a tar / broken before its first sample: nothing to publish
            self.nothing = True
        self.done.add({"key": s.id, "status": "failed", "error": s.error,
                       "error_kind": s.error_kind, "caption": s.caption or ""})  # fmt: skip

    def _samples(self, reader):
        for s in reader:
            if not s.ok:
                self.writer.skip(s.seq)
                self._failed_sample(s)
                continue
            kept = dataclasses.replace(s, image=None, members=[(e, b"" if e == s.image_ext else d)
                                                                for e, d in s.members])  # fmt: skip
            self.inflight[s.id] = kept
            yield self._sample_row(s)

    def _rows_of_chunks(self, reader):
        for chunk in reader.chunks():
            if chunk.table is None:  # the table breaks here: the rows before it stand
                self.writer.put(chunk.seq, self.writer.schema.empty_table())
                for s in chunk.samples:
                    self._failed_sample(s)
                continue
            n = chunk.table.num_rows
            state = [chunk.table, [None] * n, [None] * n, sum(s.ok for s in chunk.samples)]
            self.chunks[chunk.seq] = state
            if state[3] == 0:
                self._chunk_done(chunk.seq)
            for j, s in enumerate(chunk.samples):
                if not s.ok:
                    self._failed_sample(s)
                    continue
                self.inflight[s.id] = (chunk.seq, j)
                yield self._sample_row(s)

    def _chunk_done(self, seq: int) -> None:
        from pipeline.datasets import output_table

        table, images, exts, _ = self.chunks.pop(seq)
        self.writer.put(seq, output_table(table, self.job.ds.image_column, images, exts))

    # ---------------------------------------------------------------- out
    def _finished(self, row: dict) -> None:
        where = self.inflight.pop(row["key"])
        ok = row.get("status") == "ok" and row.get("output") is not None
        data, ext = row.pop("output", None), row.get("extension") or ""
        row.pop("opts", None)
        if isinstance(where, tuple):  # Parquet: the row stays; a failed one with a null image
            state = self.chunks[where[0]]
            state[1][where[1]], state[2][where[1]] = (data, ext) if ok else (None, None)
            state[3] -= 1
            if state[3] == 0:
                self._chunk_done(where[0])
        elif ok:
            from pipeline.datasets import output_members

            try:
                self.writer.put(where.seq, where.key, output_members(where, data, ext), where.mtime)
            except BadInput as e:
                self.writer.skip(where.seq)
                ok = False
                row = {**row, "status": "failed", "error": f"write: {e}", "error_kind": kind_of(e)}
        else:
            self.writer.skip(where.seq)  # a failed sample is left out of its shard
        self.done.add({**{k: v for k, v in row.items() if k not in ("plan", "bytes")}, "caption": row["used_caption"],
                       "output_key": self.rel if ok else ""})  # fmt: skip

    def _publish(self) -> None:
        job = self.job
        if self.nothing:
            self.writer.abort()
            self.published = True  # nothing to publish: its rows say why
            self._flush_rows()
            return
        if job.dst.tag:
            check_lease(job.dst, job.dst.tag)  # published only while DST's lease still names this job
        path = self.writer.close()
        self.published = True
        size = os.lstat(path).st_size
        receipts.add(job.dst, self.rel, size)  # the proof that this job wrote it, kept at once
        ok = self._flush_rows()
        failed = self.done.count - ok
        notes = [f"{ok} sample(s) written, {failed} failed"]
        job._record({"key": self.rel, "status": "ok", "output_key": self.rel, "written_by": job.dst.tag,
                     "out_bytes": size, "notes": notes}, count=False)  # fmt: skip
        job._say(f"done    {display(self.rel)}: {ok} ok, {failed} failed")

    def _flush_rows(self) -> int:
        ok = 0
        for r in self.done.rows():
            ok += r.get("status") == "ok"
            self.job._record(r)
        return ok

    def _abort(self, reason: str, status: str, error: BaseException | None = None) -> None:
        """Nothing of the shard is published; every sample read so far is recorded with `reason`."""
        if self.writer is not None:
            self.writer.abort()
        kind = kind_of(error) if error is not None else ""
        left = [{"key": k, "status": status, "error": reason, "error_kind": kind} for k in self.inflight]
        for r in [*self.done.rows(), *left]:
            if r.get("status") == "ok":
                r = {**r, "status": status, "error": reason, "error_kind": kind, "output_key": ""}
            self.job._record(r, count=r["status"] != "interrupted")
        if error is not None and not self.done.count and not left:  # nothing read: the shard's own row says why
            self.job._record({"key": self.rel, "status": "failed", "error": reason, "error_kind": kind})
        self.inflight = {}


class _Spill:
    """Rows appended to a temporary file on local disk and read back in order: a shard of any size costs no memory."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="pidray-rows-")
        self.count = 0

    def add(self, row: dict) -> None:
        pickle.dump(row, self.file, protocol=pickle.HIGHEST_PROTOCOL)
        self.count += 1

    def rows(self):
        self.file.flush()
        self.file.seek(0)
        for _ in range(self.count):
            yield pickle.load(self.file)
        self.file.close()
