"""DecodeStage: file bytes -> pixels + everything needed to write the output faithfully (CPU)."""

from __future__ import annotations

from pipeline.imageio import DEFAULT_MAX_PIXELS, decode, probe
from pipeline.stages.rows import DecodedRow, ReadRow


class DecodeStage:
    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels

    def process(self, row: ReadRow) -> DecodedRow:
        row = dict(row)
        data = row.pop("bytes")
        try:
            img = decode(data, max_pixels=self.max_pixels)
        except Exception as e:  # the failed row keeps the size when the header tells it (too many pixels, ...)
            try:
                e.known = {"in_hw": list(probe(data[: 1 << 20], max_pixels=1 << 62))}
            except Exception:  # Pillow on a header it could not decode: the size stays unknown, the row's error is kept
                pass
            raise
        row["image"] = img
        row["in_hw"] = list(img.size)
        if img.notes:
            row["notes"] = [*row.get("notes", []), *img.notes]
        return row
