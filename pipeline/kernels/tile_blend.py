"""Tile merge: feathered (separable raised-cosine) weighted accumulation of tiles into the canvas.

One program per (tile, tile row, column block) adds weight·pixel into the canvas and the weight
into the normaliser with atomic adds (tiles overlap); the caller divides. Float atomics make the
summation order, and so the last bits, vary run to run. Order: torch reference, kernel, host wrapper, the `Op`
record.
"""

from __future__ import annotations

import torch

from pipeline.kernels._common import HAVE_TRITON, Op


def reference(tiles: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, origins: torch.Tensor, canvas_hw):
    """Weighted accumulation of tiles [N, C, th, tw] (weights wy[N, th] ⊗ wx[N, tw]) into [C, H, W], normalised.

    Vectorised (index_add_ at each tile's pixels, tile by tile in order): no host loop over the origins, so it runs
    with the origins on the device, without a sync, and traces whole under torch.compile."""
    N, C, th, tw = tiles.shape
    Hc, Wc = canvas_hw
    origins = origins.to(tiles.device)
    rows = origins[:, :1] + torch.arange(th, device=tiles.device)  # -> [N, th]
    cols = origins[:, 1:] + torch.arange(tw, device=tiles.device)  # -> [N, tw]
    idx = (rows[:, :, None] * Wc + cols[:, None, :]).reshape(-1)  # -> [N·th·tw] canvas positions
    w = wy.float()[:, :, None] * wx.float()[:, None, :]  # -> [N, th, tw]
    vals = (tiles.float() * w[:, None]).permute(1, 0, 2, 3).reshape(C, -1)  # -> [C, N·th·tw]
    acc = torch.zeros((C, Hc * Wc), dtype=torch.float32, device=tiles.device).index_add_(1, idx, vals)
    norm = torch.zeros(Hc * Wc, dtype=torch.float32, device=tiles.device).index_add_(0, idx, w.reshape(-1))
    return (acc / norm).view(C, Hc, Wc)


if HAVE_TRITON:
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


def _cases(cfg, H, W, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    n, ov = 3, min(256, H // 4)  # a 3 × 3 grid of tiles with 256-pixel overlaps
    tiles = torch.randn(n * n, 3, H, W, device=device, dtype=dtype, generator=g).float()
    wy = torch.rand(n * n, H, device=device, generator=g) + 0.1
    wx = torch.rand(n * n, W, device=device, generator=g) + 0.1
    origins = torch.tensor([(i * (H - ov), j * (W - ov)) for i in range(n) for j in range(n)], device=device)
    canvas = (n * (H - ov) + ov, n * (W - ov) + ov)
    return [("tile_blend 3x3", lambda: tile_blend(tiles, wy, wx, origins, canvas),
             lambda: reference(tiles, wy, wx, origins, canvas))]  # fmt: skip


OP = Op("tile_blend", reference={"tile_blend": reference}, fused={"tile_blend": tile_blend}, cases=_cases)
