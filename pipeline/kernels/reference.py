"""Torch reference implementations of the fused chains; the ground truth for the Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as the official checkpoints expect."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def norm_modulate(x, weight, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    """AdaLN: RMSNorm(x)·w·(1 + scale) + shift."""
    return rms_norm(x, weight, eps) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate * y


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate x [B, N, heads, head_dim] by rope ([N, head_dim/2] cos, sin); adjacent pairs; fp32."""
    cos, sin = (r[None, :, None, :].to(x.device) for r in rope)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)


def qk_norm_rope(q, k, q_weight, k_weight, rope, eps: float = 1e-6):
    """Per-head RMSNorm of q and k, then RoPE (skipped when rope is None)."""
    q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    if rope is None:
        return q, k
    return apply_rope(q, rope), apply_rope(k, rope)


def pit_mlp(x, norm_weight, shift, scale, gate, fc1_w, fc1_b, fc2_w, fc2_b, eps: float = 1e-6) -> torch.Tensor:
    """PiT MLP sub-block: x + gate · fc2(gelu(fc1(AdaLN(x))))."""
    h = F.linear(norm_modulate(x, norm_weight, shift, scale, eps), fc1_w, fc1_b)
    return gated_residual(x, gate, F.linear(F.gelu(h), fc2_w, fc2_b))


def tile_blend(tiles: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, origins: torch.Tensor, canvas_hw):
    """Weighted accumulation of tiles [N, C, th, tw] (weights wy[N, th] ⊗ wx[N, tw]) into [C, H, W], normalised."""
    N, C, th, tw = tiles.shape
    acc = torch.zeros((C, *canvas_hw), dtype=torch.float32, device=tiles.device)
    norm = torch.zeros((1, *canvas_hw), dtype=torch.float32, device=tiles.device)
    for tile, a, b, (y, x) in zip(tiles, wy, wx, origins.tolist()):
        w = torch.outer(a.float(), b.float())
        acc[:, y : y + th, x : x + tw] += tile.float() * w
        norm[:, y : y + th, x : x + tw] += w
    return acc / norm


class TorchOps:
    """Plain-torch backend; every method is the reference its fused twin is tested against."""

    name = "torch"
    rms_norm = staticmethod(rms_norm)
    norm_modulate = staticmethod(norm_modulate)
    gated_residual = staticmethod(gated_residual)
    qk_norm_rope = staticmethod(qk_norm_rope)
    pit_mlp = staticmethod(pit_mlp)
    tile_blend = staticmethod(tile_blend)
