"""DecodeStage: file bytes -> pixels + everything needed to write the output faithfully (CPU)."""

from __future__ import annotations

from pipeline.imageio import DEFAULT_MAX_PIXELS, decode
from pipeline.stages.rows import DecodedRow, ReadRow


class DecodeStage:
    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels

    def process(self, row: ReadRow) -> DecodedRow:
        row = dict(row)
        img = decode(row.pop("bytes"), max_pixels=self.max_pixels)
        row["image"] = img
        row["in_hw"] = list(img.size)
        if img.notes:
            row["notes"] = [*row.get("notes", []), *img.notes]
        return row
