"""LatentStage: a latent file's bytes -> the latent PiD decodes (CPU): the `pidray decode` workflow's first stage.

A row names its file (`key`, or `src_key` when the job split a batch file into one row per latent) and, for a batch
file, the latent's `latent_id`. The file's caption and sigma apply unless the row (the user) gives its own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline.errors import BadInput
from pipeline.imageio import Decoded
from pipeline.latents import check_format, check_latent, read_latents, to_training_frame
from pipeline.model.presets import get_preset
from pipeline.stages.common import UpscaleOptions, options_of


def latent_source() -> Decoded:
    """What the merge stage needs to know of a source it re-creates: a latent has no alpha, colour profile or EXIF;
    its output is an RGB PNG unless a format is asked for."""
    return Decoded(rgb=np.zeros((0, 0, 3), np.uint8), alpha=None, mode="RGB", format="PNG", gray=False)


class LatentStage:
    def __init__(self, preset: str, latent_format: str | None = None, options: UpscaleOptions | dict | None = None):
        self.preset = get_preset(preset)
        self.format = latent_format
        self.options = options if isinstance(options, UpscaleOptions) else UpscaleOptions(**(options or {}))
        check_format(latent_format, self.preset)  # a --format that does not fit the preset: refused up front

    def process(self, row: dict) -> dict:
        row = dict(row)
        want = row.get("latent_id")
        items = read_latents(row.get("src_key") or row["key"], row.pop("bytes"), want)
        if not want and len(items) > 1:
            ids = ", ".join(repr(it.id) for it in items[:5]) + (", ..." if len(items) > 5 else "")
            raise BadInput(f"the file holds {len(items)} latents ({ids}): name one (id)")
        item = items[0]
        check_format(self.format or item.format, self.preset)
        check_latent(item.latent, self.preset)
        o = options_of(row, self.options)
        sigma = row.get("sigma", item.sigma)
        latent, sigma = to_training_frame(item.latent, sigma, self.preset)
        over = {}
        if sigma is not None:  # a captured x_t: conditioned at its own sigma, no further noise
            over["degrade_sigma"] = sigma
            row["noised"] = True
        if item.caption and not row.get("caption"):
            over["caption"] = item.caption
            row["caption"] = item.caption
        row["opts"] = replace(o, **over) if over else o
        row["latent"] = latent
        row["src"] = latent_source()
        return row
