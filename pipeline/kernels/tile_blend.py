"""Tile merge: feathered (separable raised-cosine) weighted accumulation of tiles into the canvas.

One program per (tile, tile row, column block) adds weight·pixel into the canvas and the weight
into the normaliser with atomic adds (tiles overlap); the caller divides. Float atomics make the
summation order, and so the last bits, vary run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_blend_kernel(
    TILES, WY, WX, OY, OX, ACC, NORM, C, th, tw, Hc, Wc, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cm = cols < tw
    oy = tl.load(OY + t).to(tl.int64)
    ox = tl.load(OX + t).to(tl.int64)
    w = tl.load(WY + t * th + r) * tl.load(WX + t * tw + cols, mask=cm, other=0.0)
    dst = (oy + r) * Wc + ox + cols
    tl.atomic_add(NORM + dst, w, mask=cm)
    for c in range(C):
        v = tl.load(TILES + ((t * C + c) * th + r) * tw + cols, mask=cm, other=0.0).to(tl.float32)
        tl.atomic_add(ACC + c * Hc * Wc + dst, v * w, mask=cm)


def tile_blend(
    tiles: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, origins: torch.Tensor, canvas_hw
) -> torch.Tensor:
    """tiles [N, C, th, tw]; wy [N, th], wx [N, tw] weights; origins [N, 2] pixel (y, x) -> canvas [C, H, W]."""
    N, C, th, tw = tiles.shape
    Hc, Wc = canvas_hw
    acc = torch.zeros((C, Hc, Wc), device=tiles.device, dtype=torch.float32)
    norm = torch.zeros((Hc, Wc), device=tiles.device, dtype=torch.float32)
    origins = origins.to(device=tiles.device, dtype=torch.int64)
    BLOCK = min(1024, triton.next_power_of_2(tw))
    grid = (N, th, triton.cdiv(tw, BLOCK))
    _tile_blend_kernel[grid](
        tiles.contiguous(), wy.float().contiguous(), wx.float().contiguous(), origins[:, 0].contiguous(),
        origins[:, 1].contiguous(), acc, norm, C, th, tw, Hc, Wc, BLOCK=BLOCK,
    )  # fmt: skip
    return acc / norm
