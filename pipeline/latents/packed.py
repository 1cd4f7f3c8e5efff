"""Packed-sequence latents: what Flux, Flux2 and Qwen-Image pipelines hand out with `output_type="latent"` (and hold
between their steps), laid back out as the [C, h, w] latent PiD's LQ encoder of that VAE produces.

- `flux-packed` (FLUX.1): [tokens, 64], one token per 2×2 patch of the 16-channel latent, (channel, row, column)
  inside the token: unpacked to [16, 2·gh, 2·gw].
- `qwenimage-packed` (Qwen-Image): the same packing of its 16-channel latent; the one-frame time axis the pipeline
  puts back before its 3D VAE is not there to drop.
- `flux2-packed` (FLUX.2, and FLUX.2-klein between steps): [tokens, 128], each token the patchified, batch-norm
  normalised latent of one position (ids in row-major order): laid out as [128, gh, gw].

FLUX.2-klein's own `output_type="latent"` is the raw 32-channel latent (the pipeline un-normalises and unpatchifies it
before returning); `flux2_normalised` patchifies it and normalises it with the VAE's batch-norm running statistics,
as the Flux2 pipelines do before their transformer.

The token grid (gh, gw) is the generator's image size / 16 — from the file's metadata (`height`, `width` of the
generated image) — or, given only an output size, the factorisation of the token count nearest its aspect ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import BadInput
from pipeline.families import FAMILIES

# packed format -> (its VAE family, the side of the patch folded into each token): the families' `packed`
PACKED = {n: (f.name, patch) for f in FAMILIES.values() for n, patch in f.packed.items()}
TOKEN_PIXELS = 16  # pixels on the side of one token of every packed format (VAE ×8, 2×2 patches)


@dataclass(frozen=True)
class Packing:
    """How to unpack one latent: its format and what fixes its token grid (the generated image's size, or the
    output's)."""

    format: str
    image_hw: tuple[int, int] | None = None  # the generator's image size (file metadata, the stage's call)
    out_hw: tuple[int, int] | None = None  # the output size asked for (--size): its aspect lays out the grid

    def __post_init__(self):
        if self.format not in PACKED:
            raise BadInput(f"{self.format!r} is not a packed latent format ({', '.join(PACKED)})")


def is_packed(fmt) -> bool:
    return str(fmt).lower() in PACKED if fmt is not None else False


def packed_dims(shape: tuple, what: str = "packed latent") -> tuple[int, int]:
    """(tokens, channels) of a packed latent's shape: [tokens, C] or [1, tokens, C]."""
    s = tuple(shape)
    if len(s) == 3 and s[0] == 1:
        s = s[1:]
    if len(s) != 2 or min(s) < 1:
        raise BadInput(f"{what} must be [tokens, channels] (or [1, tokens, channels]), got shape {list(shape)}")
    return s


def token_grid(tokens: int, p: Packing) -> tuple[int, int]:
    """The (rows, columns) of the token grid."""
    if p.image_hw is not None:
        gh, gw = (int(v) // TOKEN_PIXELS for v in p.image_hw)
        if gh * gw != tokens:
            raise BadInput(f"a {p.image_hw[1]}x{p.image_hw[0]} image packs into {gh}x{gw} = {gh * gw} tokens; the "
                           f"latent holds {tokens}")  # fmt: skip
        return gh, gw
    if p.out_hw is None:
        raise BadInput(f"a {p.format} latent needs its image size: the file's metadata (height, width of the "
                       "generated image) or --size WIDTHxHEIGHT")  # fmt: skip
    aspect = math.log(p.out_hw[1] / p.out_hw[0])
    pairs = [(d, tokens // d) for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0]
    pairs += [(w, h) for h, w in pairs]
    return min(pairs, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def unpacked_chw(shape: tuple, p: Packing) -> tuple[int, int, int]:
    """The [C, h, w] a packed latent of this shape unpacks to (from its header, before its data is read)."""
    tokens, ch = packed_dims(shape, f"a {p.format} latent")
    patch = PACKED[p.format][1]
    if ch % (patch * patch):
        raise BadInput(f"a {p.format} latent's {ch} channels are not {patch}x{patch} patches")
    gh, gw = token_grid(tokens, p)
    return ch // (patch * patch), gh * patch, gw * patch


def unpack(a: np.ndarray, p: Packing) -> np.ndarray:
    """A packed latent ([tokens, C] or [1, tokens, C]) -> [C', h, w]."""
    c, h, w = unpacked_chw(a.shape, p)
    patch = PACKED[p.format][1]
    gh, gw = h // patch, w // patch
    if patch == 1:  # each token one position's channels, row-major
        return np.ascontiguousarray(a.reshape(gh, gw, c).transpose(2, 0, 1))
    # each token a patch: (channel, row in the patch, column in the patch)
    return np.ascontiguousarray(a.reshape(gh, gw, c, patch, patch).transpose(2, 0, 3, 1, 4).reshape(c, h, w))


def flux2_normalised(raw: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> np.ndarray:
    """FLUX.2's raw [32, h, w] latent -> the [128, h/2, w/2] its transformer (and PiD's LQ encoder) works in: 2×2
    patches folded into channels in (channel, row, column) order, then (z − running mean) / √(running var + eps)."""
    c, h, w = raw.shape
    if h % 2 or w % 2:
        raise BadInput(f"a Flux2 latent's sides must be even to patchify, got {h}x{w}")
    z = raw.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3).reshape(c * 4, h // 2, w // 2)
    m = np.asarray(mean, np.float64).reshape(-1, 1, 1)
    s = np.sqrt(np.asarray(var, np.float64).reshape(-1, 1, 1) + eps)
    if m.shape[0] != c * 4:
        raise BadInput(f"the VAE's batch-norm statistics have {m.shape[0]} channels; the latent patchifies to {c * 4}")
    return ((z - m) / s).astype(np.float32)
