"""LatentStage: a latent file's bytes -> the latent PiD decodes (CPU): the `pidray decode` workflow's first stage.

A row names its file (`key`, or `src_key` when the job split a batch file into one row per latent) and, for a batch
file, the latent's `latent_id`. The file's caption and sigma apply unless the row (the user) gives its own.
A batch file is indexed once for all its rows: the last few files' indexes are kept, keyed by the file and the
version the read stage saw (`src_version`: size and mtime, or the S3 ETag), so a file replaced meanwhile is read anew.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np

from pipeline.errors import BadInput
from pipeline.imageio import Decoded
from pipeline.latents import (
    MAX_LATENT_BYTES,
    MAX_MEMBERS,
    LatentFile,
    Packing,
    check_format,
    check_latent,
    is_packed,
    open_latents,
    output_limit,
    to_training_frame,
)
from pipeline.model.presets import Preset
from pipeline.stages.common import entered


def latent_source() -> Decoded:
    """What the merge stage needs to know of a source it re-creates: a latent has no alpha, colour profile or EXIF;
    its output is an RGB PNG unless a format is asked for."""
    return Decoded(rgb=np.zeros((0, 0, 3), np.uint8), alpha=None, mode="RGB", format="PNG", gray=False)


class LatentStage:
    CACHED_FILES = 2  # indexes kept (each holds its file's bytes)

    def __init__(self, preset: Preset, latent_format: str | None = None, max_bytes: int = MAX_LATENT_BYTES,
                 max_members: int = MAX_MEMBERS):  # fmt: skip
        """preset: resolved where the job or request entered; max_bytes, max_members: what one file may inflate to
        and hold (the endpoint sets tighter bounds)."""
        self.preset = preset
        self.format = latent_format
        self.max_bytes, self.max_members = max_bytes, max_members
        check_format(latent_format, self.preset)  # a --format that does not fit the preset: refused up front
        self._files: OrderedDict[tuple, tuple[bytes, LatentFile]] = OrderedDict()

    def _open(self, name: str, data: bytes, version) -> LatentFile:
        """The file's index: from the cache when this version of it (or these very bytes) was indexed already."""
        key = (name, version if version is not None else id(data))
        hit = self._files.get(key)
        if hit is not None and (version is not None or hit[0] is data):
            self._files.move_to_end(key)
            return hit[1]
        f = open_latents(name, data, self.max_bytes, self.max_members)
        self._files[key] = (data, f)
        while len(self._files) > self.CACHED_FILES:
            self._files.popitem(last=False)
        return f

    def process(self, row: dict) -> dict:
        row = dict(row)
        want = row.get("latent_id")
        version = row.get("src_version")
        f = self._open(row.get("src_key") or row["key"], row.pop("bytes"), tuple(version) if version else None)
        if not want and len(f.ids) > 1:
            ids = ", ".join(repr(i) for i in f.ids[:5]) + (", ..." if len(f.ids) > 5 else "")
            raise BadInput(f"the file holds {len(f.ids)} latents ({ids}): name one (id)")
        o = entered(row)
        fmt = row.pop("latent_format", None) or self.format or f.common["format"]  # the row's first
        check_format(fmt, self.preset)
        out_size = row.get("out_size")
        packing = Packing(str(fmt).lower(), out_hw=tuple(out_size) if out_size else None) if is_packed(fmt) else None
        # an output over the size limit is refused from the latent's header, before its data is inflated
        item = f.item(want or f.ids[0], limit=output_limit(self.preset, o, out_size), packing=packing)
        check_latent(item.latent, self.preset)
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
