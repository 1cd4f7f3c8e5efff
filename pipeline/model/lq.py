"""LQ projection: turns the low-quality input (VAE latent and/or RGB image) into per-block features.

Both branches are aligned to the output's patch grid without learned resampling: the RGB image by
pixel-unshuffle, the latent by nearest upsampling (or folding when it is finer than the grid),
then convolutions and ResBlocks. One linear head per injection point maps the shared feature to
the transformer width; a sigma-aware gate mixes it into the image stream every `lq_interval`
blocks, strongly when the latent is clean (degrade_sigma 0) and weakly when it is noisy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import PidConfig


class SigmaGate(nn.Module):
    """x + sigmoid(W[x, lq] + b − exp(log_alpha)·sigma) · lq, per token (1 logit) or per token and channel."""

    def __init__(self, dim: int, per_dim: bool, device=None, dtype=None):
        super().__init__()
        self.content_proj = nn.Linear(2 * dim, dim if per_dim else 1, device=device, dtype=dtype)
        self.log_alpha = nn.Parameter(torch.zeros((), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, lq: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        logit = self.content_proj(torch.cat([x, lq], dim=-1))  # -> [B, L, D or 1]
        offset = -self.log_alpha.exp() * sigma.float().view(-1, 1, 1)
        return x + torch.sigmoid(logit.float() + offset).to(x.dtype) * lq  # gate in fp32, as under autocast


class ResBlock(nn.Module):
    def __init__(self, ch: int, padding_mode: str, device=None, dtype=None):
        super().__init__()
        conv = dict(kernel_size=3, padding=1, padding_mode=padding_mode, device=device, dtype=dtype)
        self.block = nn.Sequential(
            nn.GroupNorm(4, ch, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Conv2d(ch, ch, **conv),
            nn.GroupNorm(4, ch, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Conv2d(ch, ch, **conv),
        )

    def forward(self, x):
        return x + self.block(x)


def _conv_stack(in_ch: int, hidden: int, n_res: int, padding_mode: str, device=None, dtype=None) -> nn.Sequential:
    conv = dict(kernel_size=3, padding=1, padding_mode=padding_mode, device=device, dtype=dtype)
    layers = [nn.Conv2d(in_ch, hidden, **conv), nn.SiLU(), nn.Conv2d(hidden, hidden, **conv)]
    layers += [ResBlock(hidden, padding_mode, device, dtype) for _ in range(n_res)]
    return nn.Sequential(*layers)


class LQProjection(nn.Module):
    def __init__(self, cfg: PidConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        hid, pad = cfg.lq_hidden_dim, cfg.lq_conv_padding_mode
        self.cfg = cfg
        self.image_conv = None
        if cfg.lq_in_channels:
            self.unshuffle = cfg.patch_size // cfg.sr_scale
            in_ch = cfg.lq_in_channels * self.unshuffle**2
            self.image_conv = _conv_stack(in_ch, hid, cfg.lq_num_res_blocks, pad, **kw)
        self.latent_proj = None
        if cfg.lq_latent_channels:
            f = cfg.lq_latent_unpatchify_factor
            # output pixels per (unpatchified) latent pixel, divided by the patch size
            self.z_ratio = cfg.sr_scale * (cfg.latent_spatial_down_factor // f) / cfg.patch_size
            z_ch = cfg.lq_latent_channels // f**2
            if self.z_ratio < 1:
                self.fold = round(1 / self.z_ratio)
                z_ch *= self.fold**2
            self.latent_proj = _conv_stack(z_ch, hid, cfg.lq_num_res_blocks, pad, **kw)
        self.merge = None
        if cfg.lq_in_channels and cfg.lq_latent_channels:
            layers = [nn.Conv2d(2 * hid, hid, kernel_size=1, **kw), nn.SiLU()]
            layers += [ResBlock(hid, pad, **kw) for _ in range(cfg.lq_num_res_blocks)]
            self.merge = nn.Sequential(*layers)
        d = cfg.hidden_size
        self.output_heads = nn.ModuleList(nn.Linear(hid, d, **kw) for _ in range(cfg.num_lq_outputs))
        self.pit_head = nn.Linear(hid, d, **kw) if cfg.pit_lq_inject else None
        self.lq_aux_rgb_head = None
        if cfg.lq_aux_rgb_head:  # training-only: reconstructs the LQ RGB; built so the checkpoint loads
            p = cfg.patch_size // cfg.sr_scale
            self.lq_aux_rgb_head = nn.Sequential(
                nn.LayerNorm(hid, **kw), nn.Linear(hid, hid, **kw), nn.SiLU(), nn.Linear(hid, 3 * p * p, **kw)
            )
        per_dim = cfg.lq_gate_type == "sigma_aware_per_token_per_dim"
        self.gate_modules = nn.ModuleList(SigmaGate(d, per_dim, **kw) for _ in range(cfg.num_lq_outputs))

    def align_latent(self, z: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """[B, C, zh, zw] latent -> [B, C', gh, gw] on the patch grid."""
        f = self.cfg.lq_latent_unpatchify_factor
        if f > 1:  # Flux2-style 2×2 channel packing back to space: [B, C·f², h, w] -> [B, C, h·f, w·f]
            B, C, h, w = z.shape
            z = z.reshape(B, C // f**2, f, f, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C // f**2, h * f, w * f)
        if self.z_ratio > 1:
            return F.interpolate(z, size=(gh, gw), mode="nearest")
        if self.z_ratio == 1:
            if z.shape[-2:] != (gh, gw):
                z = F.interpolate(z, size=(gh, gw), mode="bilinear", align_corners=False)
            return z
        k = self.fold
        if z.shape[-2:] != (gh * k, gw * k):
            z = F.interpolate(z, size=(gh * k, gw * k), mode="bilinear", align_corners=False)
        B, C = z.shape[:2]
        z = z.reshape(B, C, gh, k, gw, k).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(B, C * k * k, gh, gw)

    def align_image(self, img: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        f = self.unshuffle
        if img.shape[-2:] != (gh * f, gw * f):
            img = F.interpolate(img, size=(gh * f, gw * f), mode="bilinear", align_corners=False)
        return F.pixel_unshuffle(img, f)  # -> [B, C·f², gh, gw]

    def forward(self, latent: torch.Tensor | None, image: torch.Tensor | None, gh: int, gw: int):
        """Returns (per-injection features, PiT feature or None), each [B, gh·gw, hidden_size]."""
        feats = []
        if self.image_conv is not None and image is not None:
            feats.append(self.image_conv(self.align_image(image, gh, gw)))
        if self.latent_proj is not None and latent is not None:
            feats.append(self.latent_proj(self.align_latent(latent, gh, gw)))
        if not feats:
            raise ValueError("this PiD model needs an LQ input: " + self.expects())
        h = self.merge(torch.cat(feats, 1)) if len(feats) == 2 else feats[0]
        tokens = h.flatten(2).transpose(1, 2)  # -> [B, gh·gw, hidden]
        heads = [head(tokens) for head in self.output_heads]
        return heads, (self.pit_head(tokens) if self.pit_head is not None else None)

    def expects(self) -> str:
        c = self.cfg
        parts = []
        if c.lq_latent_channels:
            parts.append(f"a latent with {c.lq_latent_channels} channels")
        if c.lq_in_channels:
            parts.append(f"an RGB image with {c.lq_in_channels} channels")
        return " and ".join(parts)
