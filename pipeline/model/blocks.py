"""The two transformer blocks of PixelDiT.

- `PatchBlock`: MMDiT joint attention of text and image patch tokens, each stream with its own
  AdaLN modulation, QK-RMSNorm, RoPE (2-D for the image, 1-D for the text) and SwiGLU.
- `PixelBlock` (PiT): every pixel is a token of width `pixel_dim`, modulated per pixel from its
  patch's condition; attention runs on the patch grid after compacting each patch's P² pixels
  into one token (compress → attend → expand), then a per-pixel GELU MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.kernels import Ops
from pipeline.model.layers import GeluMLP, RMSNorm, SwiGLU
from pipeline.model.math import Rope, attention


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ops: Ops, device=None, dtype=None):
        super().__init__()
        self.heads, self.ops = heads, ops
        hd = dim // heads
        kw = dict(device=device, dtype=dtype)
        self.qkv_x = nn.Linear(dim, 3 * dim, bias=False, **kw)
        self.qkv_y = nn.Linear(dim, 3 * dim, bias=False, **kw)
        self.q_norm_x, self.k_norm_x = RMSNorm(hd, ops, **kw), RMSNorm(hd, ops, **kw)
        self.q_norm_y, self.k_norm_y = RMSNorm(hd, ops, **kw), RMSNorm(hd, ops, **kw)
        self.proj_x = nn.Linear(dim, dim, **kw)
        self.proj_y = nn.Linear(dim, dim, **kw)

    def _qkv(self, linear, q_norm, k_norm, h, rope):
        B, N, C = h.shape
        q, k, v = linear(h).view(B, N, 3, self.heads, C // self.heads).unbind(2)  # -> 3 × [B, N, heads, hd]
        q, k = self.ops.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, rope, q_norm.eps)
        return q, k, v

    def forward(self, x, y, rope_img: Rope, rope_txt: Rope | None):
        qx, kx, vx = self._qkv(self.qkv_x, self.q_norm_x, self.k_norm_x, x, rope_img)
        qy, ky, vy = self._qkv(self.qkv_y, self.q_norm_y, self.k_norm_y, y, rope_txt)
        # One sequence [text, image] so every token attends to both streams.
        out = attention(torch.cat([qy, qx], 1), torch.cat([ky, kx], 1), torch.cat([vy, vx], 1))
        ny = y.shape[1]
        return self.proj_x(out[:, ny:]), self.proj_y(out[:, :ny])


class PatchBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ops: Ops, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.ops = ops
        self.norm_x1, self.norm_y1 = RMSNorm(dim, ops, **kw), RMSNorm(dim, ops, **kw)
        self.norm_x2, self.norm_y2 = RMSNorm(dim, ops, **kw), RMSNorm(dim, ops, **kw)
        self.attn = JointAttention(dim, heads, ops, **kw)
        self.mlp_x, self.mlp_y = SwiGLU(dim, **kw), SwiGLU(dim, **kw)
        # checkpoint keys: adaLN_modulation_{img,txt}.0 (see loading.KEY_RULES)
        self.mod_img = nn.Linear(dim, 6 * dim, **kw)
        self.mod_txt = nn.Linear(dim, 6 * dim, **kw)

    def forward(self, x, y, cond, rope_img: Rope, rope_txt: Rope | None):
        """x [B, L, D] image tokens, y [B, Ly, D] text tokens, cond [B, 1, D] = silu(t_emb)."""
        sx1, cx1, gx1, sx2, cx2, gx2 = self.mod_img(cond).chunk(6, dim=-1)
        sy1, cy1, gy1, sy2, cy2, gy2 = self.mod_txt(cond).chunk(6, dim=-1)
        ax, ay = self.attn(self.norm_x1.modulate(x, sx1, cx1), self.norm_y1.modulate(y, sy1, cy1), rope_img, rope_txt)
        x = self.ops.gated_residual(x, gx1, ax)
        y = self.ops.gated_residual(y, gy1, ay)
        x = self.ops.gated_residual(x, gx2, self.mlp_x(self.norm_x2.modulate(x, sx2, cx2)))
        y = self.ops.gated_residual(y, gy2, self.mlp_y(self.norm_y2.modulate(y, sy2, cy2)))
        return x, y


class PatchAttention(nn.Module):
    """Self-attention over compacted patch tokens with QK-RMSNorm and 2-D RoPE."""

    def __init__(self, dim: int, heads: int, ops: Ops, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads, self.ops = heads, ops
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **kw)
        self.q_norm, self.k_norm = RMSNorm(dim // heads, ops, **kw), RMSNorm(dim // heads, ops, **kw)
        self.proj = nn.Linear(dim, dim, **kw)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)  # -> 3 × [B, N, heads, hd]
        q, k = self.ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, rope, self.q_norm.eps)
        return self.proj(attention(q, k, v))


class PixelBlock(nn.Module):
    def __init__(
        self, pixel_dim: int, cond_dim: int, patch: int, attn_dim: int, heads: int, ops: Ops, device=None, dtype=None
    ):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.ops = ops
        self.pixel_dim = pixel_dim
        p2 = patch * patch
        self.norm1, self.norm2 = RMSNorm(pixel_dim, ops, **kw), RMSNorm(pixel_dim, ops, **kw)
        self.compress_to_attn = nn.Linear(p2 * pixel_dim, attn_dim, **kw)
        self.expand_from_attn = nn.Linear(attn_dim, p2 * pixel_dim, **kw)
        self.attn = PatchAttention(attn_dim, heads, ops, **kw)
        self.mlp = GeluMLP(pixel_dim, **kw)
        # checkpoint key: adaLN_modulation.0; output laid out [P², 6, pixel_dim]
        self.mod = nn.Linear(cond_dim, 6 * pixel_dim * p2, **kw)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, batch: int, rope: Rope) -> torch.Tensor:
        """x [B*L, P², pixel_dim] pixel tokens, cond [B*L, cond_dim] per-patch condition."""
        BL, P2, C = x.shape
        mod = self.mod(cond).view(BL, P2, 6 * C)
        s1, c1, g1, s2, c2, g2 = mod.chunk(6, dim=-1)  # each -> [B*L, P², C]
        h = self.norm1.modulate(x, s1, c1).reshape(batch, BL // batch, P2 * C)  # -> [B, L, P²·C]
        h = self.expand_from_attn(self.attn(self.compress_to_attn(h), rope))  # -> [B, L, P²·C]
        x = self.ops.gated_residual(x, g1, h.view(BL, P2, C))
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        return self.ops.pit_mlp(
            x, self.norm2.weight, s2, c2, g2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.norm2.eps
        )
