"""The representation encoders of the v1 `dinov2-2k` and `siglip-sr8x-2k` presets (RAE / Scale-RAE), on the
field's maintained implementations: transformers' `Dinov2WithRegistersModel` and `SiglipVisionModel`.

The recipe the official tokenizers apply (facts read from nv-tlabs/PiD, `pid/_src/tokenizers/dinov2_vae.py` and
`scale_rae_vae.py`):

- the image in [-1, 1] is mapped to [0, 1] and resized, whole, to the encoder's fixed input side (bicubic,
  align_corners=False; SigLIP with antialias): 448 for DINOv2 (a 32×32 grid of patch-14 tokens), 224 for SigLIP-2
  (16×16);
- normalised with the encoder's processor mean/std (ImageNet's for DINOv2, 0.5/0.5 for SigLIP-2);
- DINOv2-with-registers: last hidden state with the final LayerNorm's affine removed, the CLS and register tokens
  dropped, then each (C, H, W) position normalised by the RAE ImageNet statistics: (z − mean) / √(var + 1e-5);
- SigLIP-2: the hidden state before the final LayerNorm (the vision tower's `post_layernorm` bypassed), then an
  affine-free LayerNorm (eps 1e-6), no statistics;
- tokens reshaped to a [C, g, g] grid.

So the latent is one fixed grid for the whole image, whatever its size: a *global* encoder. The network aligns it to
its patch grid (nearest, the official rule); the stage graph therefore plans these presets at one latent pixel per
patch (`Preset.lq_unit`), and the diffuse stage spreads the grid over the tile plan with the same rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoders.base import LatentEncoder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RAEParams:
    family: str = "dinov2"  # "dinov2": Dinov2WithRegistersModel | "siglip": SiglipVisionModel
    latent_channels: int = 768
    resize: int = 448  # the encoder's fixed input side
    antialias: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    latent_stats: bool = True  # per-(C, H, W) normalisation by the RAE statistics file (DINOv2)
    stats_eps: float = 1e-5
    token_norm_eps: float = 0.0  # > 0: an affine-free LayerNorm of the tokens (SigLIP-2: 1e-6)
    down_factor: int = 16  # the official "virtual" compression: native input side / grid side (512/32, 256/16)
    act_channels: int = 0  # unused: the encode's memory does not grow with the input (see encode_bytes)

    @classmethod
    def from_dict(cls, d: dict) -> RAEParams:
        names = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)

    def encode_bytes(self, hw: tuple[int, int], hidden: int = 1152, layers_live: int = 12) -> int:
        """Peak bytes of one encode: the input in fp32 twice (mapped, resized) plus the transformer's activations at
        the fixed input side (tokens × a few hidden-wide buffers)."""
        tokens = (self.resize // 14) ** 2 + 5
        return int(hw[0] * hw[1] * 3 * 4 * 2 + tokens * hidden * 4 * layers_live)


class RAEEncoder(nn.Module, LatentEncoder):
    """image [B, 3, H, W] in [-1, 1] (any size) -> [B, C, g, g], the official recipe above."""

    global_latent = True  # one grid for the whole image (see the module docstring)

    def __init__(self, params: RAEParams, model: nn.Module, special_tokens: int, stats=None):
        super().__init__()
        self.params = params
        self.model = model
        self.special_tokens = special_tokens
        self.register_buffer("mean", torch.tensor(params.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(params.std).view(1, 3, 1, 1), persistent=False)
        if stats is not None:
            self.register_buffer("z_mean", stats[0][None].float(), persistent=False)
            self.register_buffer("z_scale", torch.sqrt(stats[1][None].float() + params.stats_eps), persistent=False)
        else:
            self.z_mean = self.z_scale = None

    @property
    def grid(self) -> int:
        patch = int(self.model.config.patch_size)
        return self.params.resize // patch

    def check_image(self, image: torch.Tensor) -> None:  # any positive size: the whole image is resized
        if image.ndim != 4 or image.shape[1] != 3 or min(image.shape[-2:]) < 1:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or Inf")

    def encode(self, image: torch.Tensor, tile_px: int | None = -1) -> torch.Tensor:
        """Always whole: the encoder sees the image at its fixed side, so memory does not grow with the input."""
        self.check_image(image)
        return self._encode(image)

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        p = self.params
        x = (image.float() + 1.0) / 2.0
        if tuple(x.shape[-2:]) != (p.resize, p.resize):
            x = F.interpolate(x, size=(p.resize, p.resize), mode="bicubic", align_corners=False,
                              antialias=p.antialias)  # fmt: skip
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        tokens = self.model(pixel_values=x.to(dtype)).last_hidden_state[:, self.special_tokens :].float()
        B, N, C = tokens.shape
        if p.token_norm_eps > 0:
            tokens = F.layer_norm(tokens, (C,), eps=p.token_norm_eps)
        g = math.isqrt(N)
        if g * g != N:
            raise ValueError(f"{p.family} gave {N} patch tokens, not a square grid")
        z = tokens.transpose(1, 2).reshape(B, C, g, g)
        if self.z_mean is not None:
            if tuple(self.z_mean.shape[1:]) != (C, g, g):
                raise ValueError(f"latent statistics are {tuple(self.z_mean.shape[1:])}, the latent is {(C, g, g)}")
            z = (z - self.z_mean) / self.z_scale
        return z


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_backbone(params: RAEParams, folder: str | Path, device="cpu", dtype=torch.float32) -> tuple[nn.Module, int]:
    """The transformers model from a local folder laid out like its hub repository (config.json +
    model.safetensors: safetensors only, never a pickle), strictly: a weight the model needs and the file lacks is
    an error. Returns (model, special tokens to drop)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a folder laid out like the encoder's hub repo)")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    _quiet_transformers()
    if params.family == "dinov2":
        from transformers import Dinov2WithRegistersModel as cls

        if model_type != "dinov2_with_registers":
            raise ValueError(f"{folder}: model_type {model_type!r}, expected 'dinov2_with_registers'")
        kw = {}
    elif params.family == "siglip":
        from transformers import SiglipVisionModel as cls

        if model_type not in ("siglip", "siglip_vision_model"):
            raise ValueError(f"{folder}: model_type {model_type!r}, expected a fixed-resolution SigLIP(-2) model "
                             "('siglip')")  # fmt: skip
        kw = {"vision_use_head": False}  # the pooling head is not part of the recipe
    else:
        raise ValueError(f"unknown representation encoder family {params.family!r}")
    model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, dtype=dtype,
                                      output_loading_info=True, **kw)  # fmt: skip
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(f"{folder}: {params.family} weights do not match the model: missing "
                         f"{sorted(info.get('missing_keys') or [])[:5]}, mismatched "
                         f"{sorted(info.get('mismatched_keys') or [])[:5]}")  # fmt: skip
    if int(model.config.hidden_size) != params.latent_channels:
        raise ValueError(f"{folder}: hidden size {model.config.hidden_size}, the preset expects "
                         f"{params.latent_channels} latent channels")  # fmt: skip
    if params.family == "dinov2":  # the final LayerNorm without its affine (RAE's "normalised" DINOv2)
        model.layernorm = nn.LayerNorm(model.config.hidden_size, eps=model.config.layer_norm_eps,
                                       elementwise_affine=False)  # fmt: skip
        special = 1 + int(model.config.num_register_tokens)
    else:  # the tokens before the final LayerNorm
        tower = getattr(model, "vision_model", model)
        tower.post_layernorm = nn.Identity()
        special = 0
    return model.to(device).eval().requires_grad_(False), special


def load_rae_encoder(params: RAEParams, paths: dict, device="cpu", dtype=torch.float32) -> RAEEncoder:
    """paths: {"encoder": the transformers folder, "stats": the RAE statistics file (DINOv2)}."""
    from pipeline.model.loading import read_state_dict

    model, special = load_backbone(params, paths["encoder"], device, dtype)
    stats = None
    if params.latent_stats:
        if not paths.get("stats"):
            raise ValueError(f"the {params.family} encoder needs its latent statistics file")
        t, _ = read_state_dict(paths["stats"])  # weights-only: a pickle that needs code is refused
        if "mean" not in t or "var" not in t:
            raise ValueError(f"{paths['stats']}: latent statistics must hold 'mean' and 'var', got {sorted(t)[:5]}")
        stats = (t["mean"], t["var"])
    return RAEEncoder(params, model, special, stats).to(device)


PARAMS, load = RAEParams, load_rae_encoder  # what pipeline.runtime looks up per encoder family
FILES_LOADER = True  # `load` takes the resolved files ({"encoder": folder, "stats": file}), not one tensor dict
