"""Qwen-Image's VAE encoder on single images: the 2D form of its causal video VAE.

The official PiD code loads a 2D conversion of the Qwen-Image VAE (`checkpoints/QwenImage_VAE_2d.pth`, a plain state
dict) whose layout we follow: `encoder.conv1`, `encoder.downsamples.*` (residual blocks of RMS norm → SiLU → conv,
zero-pad + stride-2 conv downsamples), `encoder.middle` (residual, single-head attention, residual), `encoder.head`
(RMS norm → SiLU → conv to 2·z), then a 1×1 `conv1` on the moments. latent = (mean − latents_mean) / latents_std per
channel. A diffusers `AutoencoderKLQwenImage` state dict is mapped onto it: its causal 3D kernels reduced to their
last time tap (a single frame, causally padded, sees only that tap), its time convolutions dropped (a first frame
never runs them). `tests/test_encoders.py` checks the latent against diffusers' class on tiny random weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoders.base import LatentEncoder, strict_load


@dataclass(frozen=True)
class QwenEncoderParams:
    dim: int = 96
    z_channels: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> QwenEncoderParams:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**kw)

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_channels

    @property
    def act_channels(self) -> int:  # the widest full-resolution activation (the memory estimate)
        return self.dim


class _RMSNorm(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(ch, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * self.gamma


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        conv = dict(kernel_size=3, padding=1)
        # indices as the official layout: 0 norm, 2 conv, 3 norm, 6 conv (5 was a dropout)
        self.residual = nn.Sequential(_RMSNorm(cin), nn.SiLU(), nn.Conv2d(cin, cout, **conv), _RMSNorm(cout),
                                      nn.SiLU(), nn.Identity(), nn.Conv2d(cout, cout, **conv))  # fmt: skip
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class _Attention(nn.Module):
    """One head over all H·W positions."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _RMSNorm(ch)
        self.to_qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]
        q, k, v = (t.unsqueeze(1).contiguous() for t in qkv.chunk(3, -1))  # contiguous: SDPA's fused kernels
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class _Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(ch, ch, 3, stride=2))

    def forward(self, x):
        return self.resample(x)


class _Encoder2d(nn.Module):
    def __init__(self, p: QwenEncoderParams):
        super().__init__()
        dims = [p.dim * m for m in (1, *p.dim_mult)]
        self.conv1 = nn.Conv2d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(p.num_res_blocks):
                layers.append(_Residual(cin, cout))
                cin = cout
            if i != len(p.dim_mult) - 1:
                layers.append(_Downsample(cout))
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(_Residual(c, c), _Attention(c), _Residual(c, c))
        self.head = nn.Sequential(_RMSNorm(c), nn.SiLU(), nn.Conv2d(c, 2 * p.z_channels, 3, padding=1))

    def forward(self, x):
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class QwenImageEncoder(nn.Module, LatentEncoder):
    def __init__(self, params: QwenEncoderParams):
        super().__init__()
        if len(params.latents_mean) != params.z_channels or len(params.latents_std) != params.z_channels:
            raise ValueError(f"latents_mean/std must have {params.z_channels} values each")
        self.params = params
        self.encoder = _Encoder2d(params)
        self.conv1 = nn.Conv2d(2 * params.z_channels, 2 * params.z_channels, 1)

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.conv1(self.encoder(image.to(self.conv1.weight.dtype)))
        mean = moments[:, : self.params.z_channels].float()
        m = torch.tensor(self.params.latents_mean, device=mean.device).view(1, -1, 1, 1)
        s = torch.tensor(self.params.latents_std, device=mean.device).view(1, -1, 1, 1)
        return (mean - m) / s


_RES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
        "conv_shortcut": "shortcut"}  # fmt: skip
_DIFFUSERS_RULES = [
    (re.compile(r"^encoder\.conv_in\."), "encoder.conv1."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\."),
     lambda m: f"encoder.downsamples.{m[1]}.{_RES[m[2]]}."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resample\."), r"encoder.downsamples.\1.resample."),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.(norm|to_qkv|proj)\."), r"encoder.downsamples.\1.\2."),
    (re.compile(r"^encoder\.mid_block\.resnets\.([01])\.(norm1|conv1|norm2|conv2|conv_shortcut)\."),
     lambda m: f"encoder.middle.{2 * int(m[1])}.{_RES[m[2]]}."),
    (re.compile(r"^encoder\.mid_block\.attentions\.0\."), "encoder.middle.1."),
    (re.compile(r"^encoder\.norm_out\."), "encoder.head.0."),
    (re.compile(r"^encoder\.conv_out\."), "encoder.head.2."),
    (re.compile(r"^quant_conv\."), "conv1."),
]  # fmt: skip


def from_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLQwenImage (3D, causal) -> the official 2D layout, encoder side; 2D input passes."""
    if not any(k.startswith("encoder.down_blocks.") for k in tensors):
        return tensors
    out = {}
    for key, value in tensors.items():
        if not key.startswith(("encoder.", "quant_conv.")) or ".time_conv." in key:
            continue  # decoder, post-quant conv, and the time convolutions a single frame never runs
        for pat, rep in _DIFFUSERS_RULES:
            key = pat.sub(rep, key)
        if key.endswith(".gamma"):
            value = value.reshape(-1, 1, 1)
        elif value.ndim == 5:
            value = value[:, :, -1]  # causal padding: a lone frame meets only the last time tap
        out[key] = value
    return out


def load_qwen_encoder(
    params: QwenEncoderParams, tensors: dict[str, torch.Tensor], device="cpu", dtype=torch.float32
) -> QwenImageEncoder:
    """Strict load of the encoder side (`encoder.*`, `conv1.*`) from the official 2D file or a diffusers one."""
    enc = {k: v for k, v in from_diffusers(tensors).items() if k.startswith(("encoder.", "conv1."))}
    return strict_load(QwenImageEncoder, params, enc, "Qwen-Image VAE", device, dtype)


PARAMS, load = QwenEncoderParams, load_qwen_encoder  # what pipeline.runtime looks up per VAE family
