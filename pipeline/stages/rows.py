"""The rows that cross each stage boundary, typed. Rows are plain dicts (they pickle through Ray Data and Serve as
they are); these TypedDicts say which keys each boundary adds, and the stages are annotated with them.

    ReadRow --decode--> DecodedRow --encode--> EncodedRow --diffuse--> DiffusedRow --merge--> MergedRow --write-->
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from pipeline.stages.common import OVERRIDES

# Per-row options, resolved over the job's or endpoint's defaults where the row enters (their one declaration:
# `stages.common.OVERRIDES`).
Overrides = TypedDict("Overrides", OVERRIDES, total=False)


class FailedRow(TypedDict, total=False):
    status: str  # "failed"
    error: str  # "<stage>: <message>"
    error_kind: str  # pipeline.errors kind: maps to exit and HTTP codes


class ReadRow(Overrides, FailedRow, total=False):
    key: str  # relative key (may hold surrogate-escaped bytes)
    bytes: bytes
    in_bytes: int
    src_version: tuple  # the version of the file read: (size, mtime_ns, inode) locally, (size, ETag) on S3
    output_stem: str  # the job's planned output name without extension
    replace: list[str]  # output keys this row may replace (--overwrite: outputs an earlier pidray job wrote)
    notes: list[str]
    timings: dict[str, float]
    request_id: str  # Serve: who to stop when the caller goes away
    deadline: float  # Serve: time.time() after which the work is not worth doing
    planned: Any  # Serve: the TilePlan admission made (the encode stage takes it when it fits the image)
    opts: Any  # pipeline.options.Resolved: the row's options, resolved where it entered (Workflow.enter)


class DecodedRow(ReadRow, total=False):
    image: Any  # pipeline.imageio.Decoded
    in_hw: list[int]


class EncodedRow(ReadRow, total=False):
    in_hw: list[int]
    plan: Any  # pipeline.tiling.TilePlan (the merge records it as its to_dict())
    latent: np.ndarray  # [C, h, w] float32 (or the RGB image for RGB-conditioned presets)
    caption_emb: np.ndarray  # [L, D] float32
    null_emb: np.ndarray  # [L, D] float32: the null caption (guided presets' unconditional branch)
    src: Any  # Decoded without pixels: mode, ICC, EXIF, alpha


class DiffusedRow(ReadRow, total=False):
    in_hw: list[int]
    plan: Any  # TilePlan; after the merge, its to_dict()
    src: Any
    pixels: np.ndarray  # [H, W, 3] uint8/uint16: the blended, cropped canvas at the native scale
    batch: int  # images diffused together


class MergedRow(ReadRow, total=False):
    in_hw: list[int]
    plan: Any  # TilePlan; after the merge, its to_dict()
    status: str  # "ok"
    output: bytes  # the encoded file
    out_hw: list[int]
    out_format: str
    content_type: str
    extension: str
