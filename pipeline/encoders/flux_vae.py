"""The Flux-style conv VAE encoder (BFL `ae.safetensors` key names, or diffusers' mapped on load), as used by Flux1,
SD3 and SDXL with their own scaling (SDXL's AutoencoderKL keeps a 1×1 `quant_conv` on the moments, which Flux1 and
SD3 dropped), and by Flux2: 32 channels with a quant conv, the mean patchified 2×2 to 128 channels at ×16, then
normalised by its batch-norm running statistics (eps 1e-4) instead of a scale and shift.

latent = scale_factor · (posterior_mean − shift_factor); no sampling. Decoder keys in a full
`ae.safetensors` are ignored on load (named reason: PiD replaces the decoder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoders.base import LatentEncoder, strict_load


@dataclass(frozen=True)
class FluxEncoderParams:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    quant_conv: bool = False  # SDXL, Flux2: a 1×1 conv on the 2·z moments before taking the mean
    patch: int = 1  # Flux2: the mean is patchified patch×patch into channels, (c, pi, pj) order
    batch_norm: bool = False  # Flux2: (z - running_mean) / sqrt(running_var + 1e-4) instead of scale/shift

    @classmethod
    def from_dict(cls, d: dict) -> FluxEncoderParams:
        keys = {"ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "scale_factor", "shift_factor",
                "quant_conv", "patch", "batch_norm"}  # fmt: skip
        kw = {k: v for k, v in d.items() if k in keys}
        if "ch_mult" in kw:
            kw["ch_mult"] = tuple(kw["ch_mult"])
        return cls(**kw)

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1) * self.patch

    @property
    def latent_channels(self) -> int:
        return self.z_channels * self.patch**2

    @property
    def act_channels(self) -> int:  # the widest full-resolution activation (the memory estimate)
        return self.ch * self.ch_mult[0]


FLUX1 = FluxEncoderParams()


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, 1, HW, C], contiguous: a strided last dimension sends SDPA to its math backend, which materialises
        # the [HW, HW] matrix (17 GB in fp32 at a 2048² input); contiguous q/k/v take the memory-efficient kernels.
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3).contiguous() for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the checkpoint was trained


class Encoder(nn.Module):
    def __init__(self, p: FluxEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = p.ch
        for level, mult in enumerate(p.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                stage.block.append(ResnetBlock(cin, p.ch * mult))
                cin = p.ch * mult
            if level != len(p.ch_mult) - 1:
                stage.downsample = Downsample(cin)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(cin, cin),
            AttnBlock(cin),
            ResnetBlock(cin, cin),
        )
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * p.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class _RunningStats(nn.Module):
    """Flux2's latent normalisation: a BatchNorm2d's running statistics (keys `bn.running_mean/var`), used in eval."""

    EPS = 1e-4

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))


class FluxEncoder(nn.Module, LatentEncoder):
    def __init__(self, params: FluxEncoderParams = FLUX1):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        z2 = 2 * params.z_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if params.quant_conv else None
        if params.batch_norm:
            self.bn = _RunningStats(params.latent_channels)

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1], H and W multiples of the down factor -> normalised latent (fp32)."""
        moments = self.encoder(image.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        p = self.params
        mean = moments[:, : p.z_channels].float()
        if p.patch > 1:
            B, C, h, w = mean.shape
            mean = mean.reshape(B, C, h // p.patch, p.patch, w // p.patch, p.patch).permute(0, 1, 3, 5, 2, 4)
            mean = mean.reshape(B, C * p.patch**2, h // p.patch, w // p.patch)
        if p.batch_norm:
            m, v = self.bn.running_mean.float().view(1, -1, 1, 1), self.bn.running_var.float().view(1, -1, 1, 1)
            return (mean - m) / torch.sqrt(v + _RunningStats.EPS)
        return p.scale_factor * (mean - p.shift_factor)


# diffusers AutoencoderKL (SD3's VAE file) -> BFL key names, encoder side only.
_DIFFUSERS_RULES = [
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."), r"encoder.down.\1.block.\2."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\."), r"encoder.down.\1.downsample."),
    (re.compile(r"^encoder\.mid_block\.resnets\.0\."), "encoder.mid.block_1."),
    (re.compile(r"^encoder\.mid_block\.resnets\.1\."), "encoder.mid.block_2."),
    (re.compile(r"^encoder\.mid_block\.attentions\.0\.group_norm\."), "encoder.mid.attn_1.norm."),
    (re.compile(r"^encoder\.mid_block\.attentions\.0\.to_([qkv])\."), r"encoder.mid.attn_1.\1."),
    (re.compile(r"^encoder\.mid_block\.attentions\.0\.to_out\.0\."), "encoder.mid.attn_1.proj_out."),
    (re.compile(r"^encoder\.conv_norm_out\."), "encoder.norm_out."),
    (re.compile(r"\.conv_shortcut\."), ".nin_shortcut."),
]


def from_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers-layout VAE state dict (as SD3 ships) to BFL names; BFL-layout input passes unchanged."""
    if not any(k.startswith("encoder.down_blocks.") for k in tensors):
        return tensors
    out = {}
    for key, value in tensors.items():
        if key.startswith(("quant_conv.", "bn.")):  # the same names in both layouts (SDXL, Flux2)
            out[key] = value
            continue
        if not key.startswith("encoder."):
            continue  # decoder / post-quant conv: not needed to encode
        for pat, rep in _DIFFUSERS_RULES:
            key = pat.sub(rep, key)
        if ".attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # diffusers' attention Linear -> our 1×1 Conv2d
        out[key] = value
    return out


def load_flux_encoder(
    params: FluxEncoderParams, tensors: dict[str, torch.Tensor], device="cpu", dtype=torch.float32
) -> FluxEncoder:
    """Strict load of the `encoder.*` tensors (BFL or diffusers layout); the decoder is not needed."""
    wanted = ("encoder.",) + (("quant_conv.",) if params.quant_conv else ()) + (("bn.",) if params.batch_norm else ())
    # BFL's Flux2 keeps its quant conv inside the encoder (`encoder.quant_conv`); ours sits beside it, as diffusers'
    named = {re.sub(r"^encoder\.quant_conv\.", "quant_conv.", k): v for k, v in from_diffusers(tensors).items()}
    enc_tensors = {k: v for k, v in named.items() if k.startswith(wanted) and not k.endswith("num_batches_tracked")}
    return strict_load(FluxEncoder, params, enc_tensors, "VAE encoder", device, dtype)


PARAMS, load = FluxEncoderParams, load_flux_encoder  # what pipeline.runtime looks up per VAE family
