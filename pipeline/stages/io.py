"""ReadStage and WriteStage: the bulk job's I/O, as stages of the same graph (plain classes, no Ray)."""

from __future__ import annotations

from pipeline.errors import BadInput
from pipeline.stages.rows import MergedRow, ReadRow
from pipeline.storage import Location


class ReadStage:
    """row["key"] (or `src_key`: the file of one latent of a batch file) -> row["bytes"] from SRC. The last file
    read is kept, so the rows of one batch file, which travel together, read it once."""

    def __init__(self, src: Location):
        self.src = src
        self._last: tuple[str, bytes] | None = None

    def process(self, row: ReadRow) -> ReadRow:
        key = row.get("src_key") or row["key"]
        if self._last is not None and self._last[0] == key:
            data = self._last[1]
        else:
            try:
                data = self.src.read(key)
            except Exception as e:  # missing object, permissions, a file swapped for a link, network after retries
                raise BadInput(f"{type(e).__name__}: {e}") from e
            self._last = (key, data) if row.get("src_key") else None
        return {**row, "bytes": data, "in_bytes": len(data)}


class WriteStage:
    """row["output"] -> DST at the row's planned stem (made unique and safe by the plan) + the format's extension.
    An existing file there is never replaced (OutputExists: the row fails), unless the plan allowed it for that very
    name (`replace`: outputs an earlier pidray job wrote, under --overwrite)."""

    def __init__(self, dst: Location):
        self.dst = dst

    def process(self, row: MergedRow) -> MergedRow:
        row = dict(row)
        row["output_key"] = row["output_stem"] + row["extension"]
        allowed = row["output_key"] in (row.get("replace") or ())
        self.dst.write(row["output_key"], row.pop("output"), overwrite=allowed)
        return row
