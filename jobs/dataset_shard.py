"""One shard or table of a dataset job, read → stages → writer → published: the same code wherever it runs (in the
job's own process for the local loop, `jobs.dataset_run`; in a Ray actor on a worker for --ray,
`jobs.dataset_ray`).

What runs it gives a `context` (`Context`): the job's settings, SRC and DST, the stages (`through`: sample rows in,
finished rows out, a few in flight at a time), and where the shard's manifest rows go (`record`, `say`). The shard's
samples stream from its reader through `through` into its writer, which assembles the output in input order (results
that come early wait on local disk) and publishes it whole (`pipeline.datasets.storage.publisher`: never over a file,
unless --overwrite replaces a proven earlier output). Its samples' rows wait on local disk until it is published,
then go to `record` with the shard's own row (the proof that this job wrote it). A shard stopped before it is
published (an interrupt: any BaseException that is not an Exception) publishes nothing and records its samples as
interrupted; a shard that cannot be read or written fails whole, each sample read with the reason.
"""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager

from pipeline import receipts
from pipeline.errors import BadInput, kind_of
from pipeline.latents import latent_extension
from pipeline.noise import file_seed
from pipeline.storage import check_lease, display

INTERRUPTED = "interrupted before its shard was published; --resume does the shard again"


class Context:
    """What a shard needs from what runs it: `cfg`, `ds` (the `DatasetJob`), `src` and `dst` (Locations; DST's `tag`
    is the job's id), and the methods below."""

    cfg = ds = src = dst = None

    def through(self, rows: Iterable[dict]) -> Iterator[dict]:
        """The rows through the stages; finished rows in any order."""
        raise NotImplementedError

    def hold(self) -> AbstractContextManager:
        """A block that a stop waits for (a result is taken whole, a shard is published whole)."""
        raise NotImplementedError

    def record(self, row: dict, count: bool = True) -> None:
        """A manifest row (count: it is one of the job's samples; a shard's own row is not)."""
        raise NotImplementedError

    def say(self, text: str) -> None:
        raise NotImplementedError


class Shard:
    """One shard or table: read → stages → writer, its sample rows kept on local disk until it is published.
    replace: its output in DST is an earlier output of pidray that --overwrite replaces (etag: its S3 version)."""

    def __init__(self, ctx: Context, rel: str, replace: bool = False, etag: str = ""):
        self.ctx, self.rel, self.replace, self.etag = ctx, rel, replace, etag
        self.done = RowSpill()  # finished sample rows, recorded once the shard is published
        self.inflight: dict[str, object] = {}  # sample id -> what its writer needs back (bounded by the stages)
        self.writer = None
        self.nothing = False  # the input could not be read at all: nothing is published
        self.published = False

    def run(self) -> None:
        from pipeline.datasets import ShardReader, ShardWriter, TableReader, TableWriter
        from pipeline.datasets.storage import open_input, publisher

        ctx, ds = self.ctx, self.ctx.ds
        name = self.rel.rpartition("/")[2]
        try:
            with open_input(ctx.src, self.rel, seekable=ds.format == "parquet") as f:
                if ds.format == "webdataset":
                    reader = ShardReader(f, self.rel, ds.image_key, ds.caption_key, keys=ds.reader_keys(), what=ds.what)
                    out = publisher(ctx.dst, self.rel, ctx.dst.tag, self.replace, self.etag)
                    self.writer = ShardWriter(None, name, out=out)
                    rows = self._samples(reader)
                else:
                    reader = TableReader(f, self.rel, ds.image_column, ds.caption_column, what=ds.what)
                    out = publisher(ctx.dst, self.rel, ctx.dst.tag, self.replace, self.etag)
                    self.writer = TableWriter(None, name, reader.schema, out=out)
                    self.chunks: dict[int, list] = {}
                    rows = self._rows_of_chunks(reader)
                for row in ctx.through(rows):
                    with ctx.hold():
                        self._finished(row)
                with ctx.hold():
                    self._publish()
        except Exception as e:  # the shard cannot be read or written (a name, a full disk): its samples fail
            self._abort(f"its shard failed: {e}", "failed", e)
        except BaseException:  # stopped (Ctrl-C, SIGTERM, the job's stop): nothing of it is published
            if not self.published:
                self._abort(INTERRUPTED, "interrupted")
            raise

    # ---------------------------------------------------------------- in
    def _sample_row(self, s) -> dict:
        cfg = self.ctx.cfg
        row = {"key": s.id, "bytes": s.image, "in_bytes": len(s.image), "seed": file_seed(cfg.options.seed, s.id)}
        caption = s.caption if s.caption else cfg.options.caption
        if s.caption:
            row["caption"] = s.caption  # the sample's own, over --caption
        if self.ctx.ds.latents:  # read as the latent file its bytes say it is (a name the latent stage reads by)
            row.update(cfg.latent_fields())
            row["src_key"] = "latent" + (latent_extension(s.image) or "")
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
        self.writer.put(seq, output_table(table, self.ctx.ds.image_column, images, exts))

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
        kept = {k: v for k, v in row.items() if k not in ("plan", "bytes") and not k.startswith("pidray_")}
        self.done.add({**kept, "caption": row["used_caption"], "output_key": self.rel if ok else ""})

    def _publish(self) -> None:
        ctx = self.ctx
        if self.nothing:
            self.writer.abort()
            self.published = True  # nothing to publish: its rows say why
            self._flush_rows()
            return
        if ctx.dst.tag:
            check_lease(ctx.dst, ctx.dst.tag)  # published only while DST's lease still names this job
        self.writer.close()
        self.published = True
        size = self.writer.out.size
        receipts.add(ctx.dst, self.rel, size)  # the proof that this job wrote it, kept at once (S3: its metadata)
        ok = self._flush_rows()
        failed = self.done.count - ok
        notes = [f"{ok} sample(s) written, {failed} failed"]
        ctx.record({"key": self.rel, "status": "ok", "output_key": self.rel, "written_by": ctx.dst.tag,
                    "out_bytes": size, "notes": notes}, count=False)  # fmt: skip
        ctx.say(f"done    {display(self.rel)}: {ok} ok, {failed} failed")

    def _flush_rows(self) -> int:
        ok = 0
        for r in self.done.rows():
            ok += r.get("status") == "ok"
            self.ctx.record(r)
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
            self.ctx.record(r, count=r["status"] != "interrupted")
        if error is not None and not self.done.count and not left:  # nothing read: the shard's own row says why
            self.ctx.record({"key": self.rel, "status": "failed", "error": reason, "error_kind": kind})
        self.inflight = {}


class RowSpill:
    """Rows appended to a temporary file on local disk and read back in order: a shard of any size costs no memory.
    `rows()` reads them all back once (and closes the file); `take(n)` reads them back a page at a time."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="pidray-rows-")
        self.count = 0
        self._read = -1  # rows read back by `take` (-1: none yet)

    def add(self, row) -> None:
        pickle.dump(row, self.file, protocol=pickle.HIGHEST_PROTOCOL)
        self.count += 1

    def rows(self):
        yield from self.take(self.count)
        self.close()

    def take(self, n: int) -> list:
        if self.file.closed:
            return []
        if self._read < 0:
            self.file.flush()
            self.file.seek(0)
            self._read = 0
        n = min(n, self.count - self._read)
        self._read += n
        return [pickle.load(self.file) for _ in range(n)]

    def close(self) -> None:
        self.file.close()
