"""The PiD network: PixelDiT (patch-level MMDiT + pixel-level PiT) with LQ-conditioned injection.

Flow of one forward pass for an output of H × W pixels, patch size p, grid gh × gw = H/p × W/p:
  patches  x -> unfold -> s_embedder -> [B, L, D]          text  y -> y_embedder + learned pos
  for each patch block i: (gate LQ feature in when i % lq_interval == 0) -> joint text/image block
  cond = silu(t_emb + s)  (+ PiT LQ gate)                   -> one condition per patch
  pixels   x -> pixel_embedder -> [B·L, p², d] -> PiT blocks(cond) -> final layer -> fold -> [B, 3, H, W]
The LQ features depend only on the LQ input, so `encode_lq` runs once per image and the sampler
reuses the result at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.kernels import Ops, get_ops
from pipeline.model.blocks import PatchBlock, PixelBlock
from pipeline.model.config import PidConfig
from pipeline.model.layers import ConvHead, FinalLayer, PixelEmbedder, TimestepEmbedder, TokenEmbedder
from pipeline.model.lq import LQProjection
from pipeline.model.math import rope_1d, rope_2d


@dataclass
class LQFeatures:
    """Everything the network derives from the LQ input, computed once per image."""

    heads: list[torch.Tensor]  # one [B, L, D] feature per injection point
    pit: torch.Tensor | None  # [B, L, D] PiT-level feature (v1.5)
    upsampled: torch.Tensor | None  # [B, 3, H, W] bicubic LQ image, for input_concat_lq / residual_lq


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C·p²] (features in (C, py, px) order, patches row-major): F.unfold by reshapes only,
    which is exact and which torch.compile handles (its CPU fold/unfold lowering miscompiled at > 1 thread)."""
    B, C, H, W = x.shape
    gh, gw = H // p, W // p
    # Laid out as F.unfold's [B, C·p², L], then transposed: the embedding's matmul then sees the very strides the
    # official code gives it, so the forward stays bit-identical (a contiguous [B, L, C·p²] changes the GEMM path).
    return x.reshape(B, C, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, gh * gw).transpose(1, 2)


def unpatchify(px: torch.Tensor, gh: int, gw: int, p: int) -> torch.Tensor:
    """[B, L, p², C] (pixels of each patch row-major) -> [B, C, gh·p, gw·p]: F.fold by reshapes only."""
    B, _, _, C = px.shape
    return px.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, gh * p, gw * p)


def check_shift(c: PidConfig, shift: int) -> None:
    """A shift the shifted-grid ensemble can use: half a patch (the other grid's lines fall mid-patch), in whole LQ
    pixels, on an RGB-conditioned model."""
    if not c.lq_in_channels or c.lq_latent_channels:
        raise ValueError("the shifted-grid ensemble needs an RGB-conditioned model (no VAE latent)")
    if shift <= 0 or (2 * shift) % c.patch_size or shift % c.patch_size == 0 or shift % c.sr_scale:
        raise ValueError(
            f"ensemble shift {shift} must be an odd multiple of half the patch size {c.patch_size} "
            f"and a multiple of the scale {c.sr_scale}"
        )


class PidNet(nn.Module):
    def __init__(self, cfg: PidConfig, ops: Ops | None = None, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.ops = ops = ops or get_ops()
        kw = dict(device=device, dtype=dtype)
        D, p = cfg.hidden_size, cfg.patch_size
        self.s_embedder = TokenEmbedder(cfg.pixel_in_channels * p * p, D, **kw)
        self.t_embedder = TimestepEmbedder(D, **kw)
        self.y_embedder = TokenEmbedder(cfg.txt_embed_dim, D, ops, **kw)
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.txt_max_length, D, **kw))
        self.pixel_embedder = PixelEmbedder(cfg.pixel_in_channels, cfg.pixel_hidden_size, **kw)
        self.patch_blocks = nn.ModuleList(PatchBlock(D, cfg.num_groups, ops, **kw) for _ in range(cfg.patch_depth))
        self.pixel_blocks = nn.ModuleList(
            PixelBlock(cfg.pixel_hidden_size, D, p, cfg.pixel_attn_dim, cfg.pixel_heads, ops, **kw)
            for _ in range(cfg.pixel_depth)
        )
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels, ops, **kw)
        self.out_conv = ConvHead(cfg.pixel_hidden_size, cfg.out_conv, cfg.in_channels, **kw) if cfg.out_conv else None
        self.lq_proj = LQProjection(cfg, **kw) if cfg.has_lq else None
        self.pit_lq_gate = None
        if cfg.pit_lq_inject:
            from pipeline.model.lq import SigmaGate

            self.pit_lq_gate = SigmaGate(D, cfg.lq_gate_type == "sigma_aware_per_token_per_dim", **kw)
        self._rope_cache: dict[tuple, tuple] = {}

    # ----------------------------------------------------------------- helpers
    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.cfg.patch_size
        if height <= 0 or width <= 0 or height % p or width % p:
            raise ValueError(f"output size {height}x{width} must be positive multiples of the patch size {p}")
        return height // p, width // p

    def _ropes(self, gh: int, gw: int, n_txt: int, device):
        key = (gh, gw, n_txt, device)
        if key not in self._rope_cache:
            c = self.cfg
            ref = (c.rope_ref_h // c.patch_size, c.rope_ref_w // c.patch_size) if c.rope_mode == "ntk_aware" else None
            img = rope_2d(c.head_dim, gh, gw, ntk_ref=ref, device=device)
            pix = rope_2d(c.pixel_attn_dim // c.pixel_heads, gh, gw, ntk_ref=ref, device=device)
            txt = rope_1d(c.head_dim, n_txt, theta=c.text_rope_theta, device=device) if c.use_text_rope else None
            self._rope_cache = {key: (img, pix, txt)}  # one size at a time: tiles share a shape
        return self._rope_cache[key]

    # ----------------------------------------------------------------- LQ
    def encode_lq(
        self,
        out_hw: tuple[int, int],
        latent: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> LQFeatures:
        """Project the LQ input for an output of `out_hw` pixels. latent [B, C, h, w]; image [B, 3, h, w] in [-1, 1]."""
        c = self.cfg
        if self.lq_proj is None:
            raise ValueError("this PiD model has no LQ branch (text-to-image configuration)")
        gh, gw = self.grid(*out_hw)
        if latent is not None:
            if latent.ndim != 4 or latent.shape[1] != c.lq_latent_channels:
                raise ValueError(
                    f"latent must be [B, {c.lq_latent_channels}, h, w] for this preset, got {tuple(latent.shape)}"
                )
            if not torch.isfinite(latent).all():
                raise ValueError("latent contains NaN or Inf")
            if min(latent.shape[2:]) < 1:
                raise ValueError(f"latent must have a positive size, got {tuple(latent.shape)}")
        if image is not None:
            if image.ndim != 4 or image.shape[1] != c.lq_in_channels or min(image.shape[2:]) < 1:
                raise ValueError(f"LQ image must be [B, {c.lq_in_channels}, h, w], got {tuple(image.shape)}")
        # A latent or LQ image that does not match the output grid is aligned as the official network does
        # (`LQProjection.align_latent` / `align_image`: nearest or bilinear to the patch grid), never refused.
        heads, pit = self.lq_proj(latent, image if c.lq_in_channels else None, gh, gw)
        up = None
        if c.input_concat_lq or c.residual_lq:
            if image is None:
                raise ValueError("this preset needs the LQ RGB image")
            up = F.interpolate(image, size=tuple(out_hw), mode="bicubic", align_corners=False)
        return LQFeatures(heads, pit, up)

    # ----------------------------------------------------------------- shifted-grid ensemble (RGB LQ models)
    def encode_lq_shifted(self, out_hw: tuple[int, int], image: torch.Tensor, shift: int) -> LQFeatures:
        """LQ features for the shifted pass: the LQ image padded by shift/scale pixels (edge values) on every side,
        so its patch grid lies `shift` output pixels off the plain one."""
        check_shift(self.cfg, shift)
        u = shift // self.cfg.sr_scale
        padded = F.pad(image, (u, u, u, u), mode="replicate")
        return self.encode_lq((out_hw[0] + 2 * shift, out_hw[1] + 2 * shift), image=padded)

    def forward_shift_ensemble(self, x, t, y, lq: LQFeatures, lq_shifted: LQFeatures, degrade_sigma, shift: int):
        """The mean of the plain prediction and the one on the grid shifted by `shift` pixels (cropped back): the
        two patch grids' seams fall in each other's patch middles, so the patch grid averages away (~2.1x work)."""
        a = self(x, t, y, lq, degrade_sigma)
        s = shift
        b = self(F.pad(x, (s, s, s, s), mode="replicate"), t, y, lq_shifted, degrade_sigma)[..., s:-s, s:-s]
        return 0.5 * (a + b)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        lq: LQFeatures | None = None,
        degrade_sigma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, 3, H, W] noisy image, t [B] timestep ×1000, y [B, Ly, txt_dim] caption embedding.

        Returns the network prediction ([B, 3, H, W]; velocity for released checkpoints).
        """
        c = self.cfg
        B, _, H, W = x.shape
        gh, gw = self.grid(H, W)
        p, D = c.patch_size, c.hidden_size
        if y.ndim != 3 or y.shape[-1] != c.txt_embed_dim:
            raise ValueError(f"caption embedding must be [B, L, {c.txt_embed_dim}], got {tuple(y.shape)}")
        if lq is None and c.has_lq:
            raise ValueError("this PiD model needs LQ features: call encode_lq first")
        if lq is not None and lq.heads and degrade_sigma is None:
            degrade_sigma = torch.zeros(B, device=x.device)
        x_in = torch.cat([x, lq.upsampled.to(x.dtype)], 1) if c.input_concat_lq else x

        rope_img, rope_pix, rope_txt = self._ropes(gh, gw, min(y.shape[1], c.txt_max_length), x.device)
        y = y[:, : c.txt_max_length]
        y = self.y_embedder(y) + self.y_pos_embedding[:, : y.shape[1]].to(x.dtype)
        t_emb = self.t_embedder(t.reshape(-1)).view(B, 1, D)
        cond = F.silu(t_emb)

        s = self.s_embedder(patchify(x_in, p))  # -> [B, L, D]
        for i, block in enumerate(self.patch_blocks):
            if lq is not None and i % c.lq_interval == 0 and i // c.lq_interval < len(lq.heads):
                s = self.lq_proj.gate_modules[i // c.lq_interval](s, lq.heads[i // c.lq_interval], degrade_sigma)
            s, y = block(s, y, cond, rope_img, rope_txt)
        s = F.silu(t_emb + s)
        if self.pit_lq_gate is not None and lq is not None and lq.pit is not None:
            s = self.pit_lq_gate(s, lq.pit, degrade_sigma)

        L = gh * gw
        px = self.pixel_embedder(x_in, p)  # -> [B·L, p², d]
        s = s.reshape(B * L, D)
        for block in self.pixel_blocks:
            px = block(px, s, B, rope_pix)
        if self.out_conv is None:
            px = self.final_layer(px)  # -> [B·L, p², 3]
            out = unpatchify(px.view(B, L, p * p, -1), gh, gw, p)  # -> [B, 3, H, W]
        else:
            h = unpatchify(self.final_layer.norm(px).view(B, L, p * p, -1), gh, gw, p)  # -> [B, d, H, W]
            out = F.conv2d(h, self.final_layer.linear.weight[:, :, None, None], self.final_layer.linear.bias)
            out = out + self.out_conv(h)
        if c.residual_lq:
            out = out + lq.upsampled.to(out.dtype)
        return out
