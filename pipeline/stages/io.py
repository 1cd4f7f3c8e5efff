"""ReadStage and WriteStage: the bulk job's I/O, as stages of the same graph (plain classes, no Ray)."""

from __future__ import annotations

from pipeline import receipts
from pipeline.errors import BadInput, TooLarge, storage_failures
from pipeline.stages.rows import MergedRow, ReadRow
from pipeline.storage import Location, check_lease


class ReadStage:
    """row["key"] (or `src_key`: the file of one latent of a batch file) -> row["bytes"] from SRC, and the version
    read (`src_version`). The last file read is kept, so the rows of one batch file, which travel together, read it
    once. A read is bounded: a file over the input limit (maybe swapped for a bigger one after planning) is refused
    from its size, never read in full."""

    def __init__(self, src: Location):
        self.src = src
        self._last: tuple[str, bytes, tuple] | None = None

    def process(self, row: ReadRow) -> ReadRow:
        key = row.get("src_key") or row["key"]
        if self._last is not None and self._last[0] == key:
            data, version = self._last[1:]
        else:
            try:
                data, version = self.src.read_versioned(key)
            except TooLarge:
                raise
            except storage_failures() as e:  # missing object, permissions, a file swapped for a link, network
                raise BadInput(f"{type(e).__name__}: {e}") from e
            self._last = (key, data, version) if row.get("src_key") else None
        return {**row, "bytes": data, "in_bytes": len(data), "src_version": version}


class WriteStage:
    """row["output"] -> DST at the row's planned stem (made unique and safe by the plan) + the format's extension.
    An existing file there is never replaced (OutputExists: the row fails), unless the plan allowed it for that very
    name (`replace`: outputs an earlier pidray job wrote, under --overwrite)."""

    def __init__(self, dst: Location):
        self.dst = dst

    def process(self, row: MergedRow) -> MergedRow:
        row = dict(row)
        row["output_key"] = row["output_stem"] + row["extension"]
        replace = row.get("replace") or {}
        allowed = row["output_key"] in replace
        expect = replace.get(row["output_key"]) if isinstance(replace, dict) else None
        data = row.pop("output")
        if self.dst.tag:  # a leased job's DST: published only while DST's lease still names this job (LeaseLost)
            check_lease(self.dst, self.dst.tag)
        self.dst.write(row["output_key"], data, overwrite=allowed, expect=expect)
        receipts.add(self.dst, row["output_key"], len(data))  # the proof that this job wrote it, kept at once
        row["out_bytes"] = len(data)  # the manifest's proof of what this job wrote (with the job's id)
        return row
