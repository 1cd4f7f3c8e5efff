"""MergeStage: feathered blend of pixel tiles, exact crop, scale, alpha, colour/bit depth, file bytes (CPU)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.imageio import CONTENT_TYPES, EXTENSIONS, encode, from_float, output_format, resize_plane
from pipeline.stages.common import USER_ERRORS, UpscaleOptions, failed, is_failed, timed
from pipeline.tiling import TilePlan, blend, target_size


class MergeStage:
    def __init__(self, options: UpscaleOptions | dict | None = None):
        self.options = options if isinstance(options, UpscaleOptions) else UpscaleOptions(**(options or {}))

    def __call__(self, row: dict) -> dict:
        if is_failed(row):
            return row
        row = dict(row)
        try:
            with timed(row, "merge"):
                plan = TilePlan.from_dict(row["plan"])
                src = row.pop("src")
                canvas = blend(torch.from_numpy(row.pop("tiles")), plan)
                oh, ow = plan.out_hw
                canvas = canvas[:, :oh, :ow].numpy()
                rgb = from_float(canvas, src.bits)
                size = target_size(plan.in_hw, plan.sr_scale, row.get("scale", self.options.scale))
                if size != (oh, ow):
                    rgb = np.stack([resize_plane(rgb[..., c], size) for c in range(3)], axis=-1)
                alpha = resize_plane(src.alpha, size) if src.alpha is not None else None
                fmt = output_format(src, row.get("format") or self.options.format)
                data = encode(rgb, src, fmt, quality=int(row.get("quality", self.options.quality)), alpha=alpha)
        except USER_ERRORS as e:
            return failed(row, "merge", e)
        row.update(
            status="ok",
            output=data,
            out_hw=list(size),
            out_format=fmt,
            content_type=CONTENT_TYPES.get(fmt, "application/octet-stream"),
            extension=EXTENSIONS.get(fmt, ".png"),
        )
        return row
