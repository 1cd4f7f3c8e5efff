"""Torch reference implementations of the fused chains; the ground truth for any faster backend."""

from __future__ import annotations

import torch


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


class TorchOps:
    """Plain-torch backend; every method is the reference its fused twin is tested against."""

    name = "torch"
    rms_norm = staticmethod(rms_norm)
    norm_modulate = staticmethod(norm_modulate)
    gated_residual = staticmethod(gated_residual)
