"""DecodeStage: file bytes -> pixels + everything needed to write the output faithfully (CPU)."""

from __future__ import annotations

from pipeline.imageio import DEFAULT_MAX_PIXELS, ImageError, decode
from pipeline.stages.common import failed, is_failed, timed


class DecodeStage:
    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels

    def __call__(self, row: dict) -> dict:
        if is_failed(row):
            return row
        row = dict(row)
        try:
            with timed(row, "decode"):
                img = decode(row["bytes"], max_pixels=self.max_pixels)
        except ImageError as e:
            return failed(row, "decode", e)
        row.pop("bytes")
        row["image"] = img
        row["in_hw"] = list(img.size)
        if img.notes:
            row["notes"] = [*row.get("notes", []), *img.notes]
        return row
