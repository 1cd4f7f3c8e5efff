"""Small building blocks of PixelDiT: norms, feed-forwards, embedders, the final pixel head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kernels import Ops
from pipeline.model.math import sincos_2d, timestep_features


class RMSNorm(nn.Module):
    def __init__(self, dim: int, ops: Ops, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.ops.norm_modulate(x, self.weight, shift, scale, self.eps)


class SwiGLU(nn.Module):
    """Patch-block feed-forward: w2(silu(w1 x) * w3 x), hidden = int(2/3 * 4 * dim)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        hidden = int(2 * int(4 * dim) / 3)
        kw = dict(bias=False, device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, hidden, **kw)
        self.w3 = nn.Linear(dim, hidden, **kw)
        self.w2 = nn.Linear(hidden, dim, **kw)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """Per-pixel feed-forward of the PiT blocks: fc2(gelu(fc1 x)), 4× expansion."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim, device=device, dtype=dtype)
        self.fc2 = nn.Linear(4 * dim, dim, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, device=None, dtype=None):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Linear(hidden, hidden, device=device, dtype=dtype),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class TokenEmbedder(nn.Module):
    """Linear projection with an optional RMSNorm after it (the text embedder has one)."""

    def __init__(self, in_dim: int, out_dim: int, ops: Ops | None = None, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.norm = RMSNorm(out_dim, ops, device=device, dtype=dtype) if ops is not None else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x))


class PixelEmbedder(nn.Module):
    """Per-pixel linear projection plus a fixed sin-cos position over the whole image, grouped by patch."""

    def __init__(self, in_channels: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_channels, dim, device=device, dtype=dtype)
        self._pos: dict[tuple, torch.Tensor] = {}

    def position(self, height: int, width: int, device, dtype) -> torch.Tensor:
        key = (height, width, device, dtype)
        if key not in self._pos:
            self._pos = {key: sincos_2d(self.dim, height, width, device=device).to(dtype)}  # keep one size
        return self._pos[key]

    def forward(self, x: torch.Tensor, patch: int) -> torch.Tensor:
        B, _, H, W = x.shape
        h = self.proj(x.permute(0, 2, 3, 1))  # -> [B, H, W, D]
        h = h + self.position(H, W, x.device, h.dtype).view(H, W, self.dim)
        h = h.view(B, H // patch, patch, W // patch, patch, self.dim).permute(0, 1, 3, 2, 4, 5)
        return h.reshape(B * (H // patch) * (W // patch), patch * patch, self.dim)  # -> [B*L, P², D]


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int, ops: Ops, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(dim, ops, device=device, dtype=dtype)
        self.linear = nn.Linear(dim, out_channels, device=device, dtype=dtype)

    def forward(self, x):
        return self.linear(self.norm(x))


class ConvHead(nn.Module):
    """A pixel-level head over the whole feature map: 3×3 conv, GELU, 3×3 conv (replicate padding at the edges).
    Its output starts at zero (the last conv is zero-initialised by the trainer) and is added to the per-pixel one."""

    def __init__(self, dim: int, hidden: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        kw = dict(padding=1, padding_mode="replicate", device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(dim, hidden, 3, **kw)
        self.conv2 = nn.Conv2d(hidden, out_channels, 3, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, out, H, W]
        return self.conv2(F.gelu(self.conv1(x)))
