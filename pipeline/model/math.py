"""Position encodings and attention: 2-D RoPE (plain and NTK-aware), 1-D text RoPE, sin-cos pixel positions.

RoPE tables are (cos, sin) pairs of shape [N, head_dim // 2]; `pipeline.kernels.qk_norm_rope.apply_rope` rotates
adjacent channel pairs (x[2i], x[2i+1]) by angle i, the convention of the official checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Rope = tuple[torch.Tensor, torch.Tensor]


def rope_2d(
    head_dim: int,
    height: int,
    width: int,
    *,
    ntk_ref: tuple[int, int] | None = None,
    theta: float = 10000.0,
    extent: float = 16.0,
    device=None,
) -> Rope:
    """2-D RoPE over a height × width token grid, row-major.

    Positions span [0, extent] on each axis whatever the grid size (linspace), and the angles
    interleave x and y: [x0, y0, x1, y1, ...]. With `ntk_ref=(ref_h, ref_w)` (grid cells) the
    base theta of each axis is scaled by (size / ref) ** (d / (d - 2)), d = head_dim // 2.
    """
    theta_h = theta_w = theta
    if ntk_ref is not None:
        d = head_dim // 2
        if d > 2:
            theta_h = theta * (height / ntk_ref[0]) ** (d / (d - 2))
            theta_w = theta * (width / ntk_ref[1]) ** (d / (d - 2))
    exponents = torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim
    freqs_w = 1.0 / (theta_w**exponents)
    freqs_h = 1.0 / (theta_h**exponents)
    y, x = torch.meshgrid(
        torch.linspace(0, extent, height, device=device),
        torch.linspace(0, extent, width, device=device),
        indexing="ij",
    )
    ang_x = torch.outer(x.reshape(-1), freqs_w)  # -> [H*W, head_dim/4]
    ang_y = torch.outer(y.reshape(-1), freqs_h)
    angles = torch.stack([ang_x, ang_y], dim=-1).reshape(height * width, -1)  # -> [H*W, head_dim/2]
    return torch.cos(angles), torch.sin(angles)


def rope_1d(head_dim: int, length: int, *, theta: float = 10000.0, device=None) -> Rope:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.arange(length, device=device).float()[:, None] * freqs[None, :]  # -> [L, head_dim/2]
    return torch.cos(angles), torch.sin(angles)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, N, heads, head_dim] -> [B, N, heads * head_dim], through SDPA (flash backends on GPU)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    omega = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64, device=pos.device) / half))
    angles = pos.double().reshape(-1, 1) * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # -> [M, dim]


def sincos_2d(dim: int, height: int, width: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of every pixel, [H*W, dim] row-major, x half first (float64)."""
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    return torch.cat([sincos_1d(dim // 2, x), sincos_1d(dim // 2, y)], dim=1)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10.0) -> torch.Tensor:
    """Sinusoidal features of t (already ×1000): [cos | sin]. max_period=10 is what PixelDiT uses."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[..., None].float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
