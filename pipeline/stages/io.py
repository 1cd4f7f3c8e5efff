"""ReadStage and WriteStage: the bulk job's I/O, as stages of the same graph (plain classes, no Ray)."""

from __future__ import annotations

from pipeline.errors import BadInput
from pipeline.stages.rows import MergedRow, ReadRow
from pipeline.storage import Location


class ReadStage:
    """row["key"] -> row["bytes"] from SRC."""

    def __init__(self, src: Location):
        self.src = src

    def process(self, row: ReadRow) -> ReadRow:
        try:
            data = self.src.read(row["key"])
        except Exception as e:  # missing object, permissions, a file swapped for a link, network after retries
            raise BadInput(f"{type(e).__name__}: {e}") from e
        return {**row, "bytes": data, "in_bytes": len(data)}


class WriteStage:
    """row["output"] -> DST at the row's planned stem (made unique and safe by the plan) + the format's extension."""

    def __init__(self, dst: Location):
        self.dst = dst

    def process(self, row: MergedRow) -> MergedRow:
        row = dict(row)
        row["output_key"] = row["output_stem"] + row["extension"]
        self.dst.write(row["output_key"], row.pop("output"))
        return row
