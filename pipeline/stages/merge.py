"""MergeStage: the diffused canvas (already blended and cropped) -> scale, alpha, colour/bit depth, file bytes (CPU)."""

from __future__ import annotations

import numpy as np

from pipeline.imageio import ALPHA_FORMATS, CONTENT_TYPES, EXTENSIONS, encode, output_format, resize_plane
from pipeline.options import parse_color
from pipeline.stages.common import entered
from pipeline.stages.rows import DiffusedRow, MergedRow
from pipeline.tiling import target_size


class MergeStage:
    """Reads each row's options as it entered (`opts`: scale, format, quality, background); holds nothing."""

    def process(self, row: DiffusedRow) -> MergedRow:
        """The last stage: the row leaves the pipeline here, its plan recorded as plain data (`TilePlan.to_dict`)."""
        row = dict(row)
        plan = row["plan"]
        src = row.pop("src")
        rgb = row.pop("pixels")  # [H, W, 3] uint8/uint16 at the native scale
        o = entered(row)
        size = target_size(plan.in_hw, plan.sr_scale, o.scale)
        if size != rgb.shape[:2]:
            rgb = np.stack([resize_plane(rgb[..., c], size) for c in range(3)], axis=-1)
        alpha = resize_plane(src.alpha, size) if src.alpha is not None else None
        fmt = output_format(src, o.format)  # None: the input's own (its decoded source says which)
        data = encode(rgb, src, fmt, quality=o.quality, alpha=alpha, background=parse_color(o.background))
        if alpha is not None and fmt not in ALPHA_FORMATS:  # said in the row's notes and on the terminal
            note = (f"transparency dropped: {fmt} has no alpha channel; flattened onto {o.background} (-f png keeps "
                    "it, --background picks the colour)")  # fmt: skip
            row["notes"] = [*row.get("notes", []), note]
            row["warnings"] = [*row.get("warnings", []), note]
        row.update(
            plan=plan.to_dict(),
            status="ok",
            output=data,
            out_hw=list(size),
            out_format=fmt,
            content_type=CONTENT_TYPES.get(fmt, "application/octet-stream"),
            extension=EXTENSIONS.get(fmt, ".png"),
        )
        return row
