"""A latent's values: the limits every latent file is held to, what one latent is (`LatentItem`), and the checks of
its shape, its numbers and its text fields (captions, ids, sigmas), made before any of it is used."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from pipeline.errors import BadInput, TooLarge

LATENT_EXTENSIONS = (".safetensors", ".npy", ".npz")
MAX_LATENT_ELEMS = 1 << 28  # 1 GiB of fp32: far beyond any 16K output's latent
MAX_LATENT_BYTES = 1 << 30  # all the latents of one file, decompressed (the size limit of a job's input file)
MAX_MEMBERS = 100_000  # latents (named tensors, .npz members) in one file
MAX_HEADER = 16 << 20  # a safetensors header's JSON
MAX_CAPTION_CHARS = 4000  # a caption in a latent file: as long as a prompt may be
READ_CHUNK = 1 << 20  # an array's data is read (inflated) this much at a time, into the array itself


def is_latent_key(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in LATENT_EXTENSIONS


@dataclass
class LatentItem:
    id: str | None
    latent: np.ndarray  # [C, h, w] float32
    caption: str | None = None
    sigma: float | None = None
    format: str | None = None


def text_field(v, what: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise BadInput(f"{what} must be text, got {type(v).__name__}")
    if len(v) > MAX_CAPTION_CHARS:
        raise BadInput(f"{what} is {len(v):,} characters, over the limit of {MAX_CAPTION_CHARS:,}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid text (it holds a lone UTF-16 surrogate)") from None
    return v


def number_field(v, what: str) -> float | None:
    if v is None:
        return None
    try:
        if isinstance(v, bool):
            raise TypeError
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"{what} must be a number, got {str(v)[:40]!r}") from None
    if not math.isfinite(f) or f < 0:
        raise BadInput(f"{what} must be a finite number >= 0, got {str(v)[:40]!r}")
    return f


def chw_shape(shape: tuple) -> tuple | None:
    """The [C, h, w] a latent's shape stands for, by the rules of `as_chw` (None: none)."""
    s = tuple(shape)
    if len(s) == 5 and s[0] == 1:  # [1, C, T, h, w]
        s = s[1:]
    if len(s) == 4 and s[0] == 1:
        s = s[1:]
    elif len(s) == 4 and s[1] == 1:  # [C, 1, h, w]
        s = (s[0], *s[2:])
    return s if len(s) == 3 else None


def check_shape(shape: tuple, what: str, limit=None) -> None:
    """A latent's shape from its file's header: one `as_chw` takes, with no empty dimension, and within `limit`."""
    chw = chw_shape(shape)
    if chw is None:
        raise BadInput(f"{what} must be [C, h, w] (or [1, C, h, w]), got shape {list(shape)}")
    if min(chw) < 1:
        raise BadInput(f"{what} has an empty dimension: {list(shape)}")
    if limit is not None:
        try:
            limit(chw)
        except TooLarge as e:
            raise TooLarge(f"{what} of shape {list(shape)}: {e}") from None


def as_chw(a: np.ndarray, id_: str | None) -> np.ndarray:
    what = f"latent {id_!r}" if id_ else "latent"
    if not np.issubdtype(a.dtype, np.floating):
        raise BadInput(f"{what} must be floating point, got {a.dtype}")
    shape = a.shape
    if a.ndim == 5 and a.shape[0] == 1:  # [1, C, T, h, w]
        a = a[0]
    if a.ndim == 4 and a.shape[0] == 1:  # [1, C, h, w]
        a = a[0]
    elif a.ndim == 4 and a.shape[1] == 1:  # a video latent with one frame: [C, 1, h, w]
        a = a[:, 0]
    if a.ndim != 3:
        raise BadInput(f"{what} must be [C, h, w] (or [1, C, h, w]), got shape {list(shape)}")
    if min(a.shape) < 1:
        raise BadInput(f"{what} has an empty dimension: {list(shape)}")
    if a.size > MAX_LATENT_ELEMS:
        raise BadInput(f"{what} has {a.size:,} elements, over the limit of {MAX_LATENT_ELEMS:,}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not a.flags.writeable:  # a view of the file's bytes: the latent is the row's own
        a = a.copy()
    if not np.isfinite(a).all():
        raise BadInput(f"{what} contains NaN or Inf")
    return a
