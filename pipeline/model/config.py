"""Parameters of the PiD network (PixelDiT backbone + LQ projection), one frozen dataclass.

Field names follow the official `PidNet(...)` keyword arguments so a released or golden config
maps onto it without translation. Training-only arguments are accepted by `from_official` and
dropped, each with a named reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Official kwargs that change nothing at inference time.
_TRAINING_ONLY = {
    "repa_encoder_index": "REPA feature tap, a training loss",
    "zero_init_lq": "initialisation only",
    "train_lq_proj_only": "freezes parameters for training",
    "num_text_blocks": "unused by the official network",
    "lq_inject_mode": "only 'controlnet' exists",
    "lq_aux_rgb_head_latent_block_idx": "selects the aux head's tap, which inference never runs",
}

GATE_TYPES = ("sigma_aware_per_token", "sigma_aware_per_token_per_dim")
ROPE_MODES = ("original", "ntk_aware")
PADDING_MODES = ("zeros", "reflect", "replicate")


@dataclass(frozen=True)
class PidConfig:
    # --- PixelDiT backbone ---
    in_channels: int = 3
    num_groups: int = 24  # attention heads of the patch blocks
    hidden_size: int = 1536
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int | None = 1152  # None: hidden_size
    pixel_num_groups: int | None = 16  # None: num_groups
    patch_depth: int = 14
    pixel_depth: int = 2
    patch_size: int = 16
    txt_embed_dim: int = 2304
    txt_max_length: int = 300
    use_text_rope: bool = True
    text_rope_theta: float = 10000.0
    rope_mode: str = "ntk_aware"  # the official PidNet default; PixDiT_T2I defaults to "original"
    rope_ref_h: int = 1024  # pixels; the grid reference is rope_ref_h // patch_size
    rope_ref_w: int = 1024
    enable_ed: bool = False  # encoder-decoder token compression: no released checkpoint uses it
    # --- LQ projection (0 channels disables a branch; both 0 = plain text-to-image) ---
    lq_in_channels: int = 0
    lq_latent_channels: int = 16
    lq_hidden_dim: int = 512
    lq_num_res_blocks: int = 4
    lq_latent_unpatchify_factor: int = 1
    lq_conv_padding_mode: str = "zeros"
    lq_aux_rgb_head: bool = False  # training-only head; built so its checkpoint keys load
    lq_gate_type: str = "sigma_aware_per_token_per_dim"
    lq_interval: int = 2
    sr_scale: int = 4
    latent_spatial_down_factor: int = 8
    pit_lq_inject: bool = False
    # --- pidray extensions for small self-trained models (off for released presets) ---
    prediction_type: str = "velocity"  # "velocity" | "x0"
    input_concat_lq: bool = False  # bicubic LQ image concatenated to the pixel input
    residual_lq: bool = False  # output added to the bicubic LQ image
    # Hidden channels of a pixel-level conv head (3×3, GELU, 3×3) over the final pixel features, added to the
    # per-pixel output; 0 = none. Unlike the per-patch pixel weights it sees across patch borders (no patch grid).
    out_conv: int = 0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"PidConfig: {msg}")

        for name in ("hidden_size", "num_groups", "patch_depth", "pixel_depth", "patch_size", "pixel_hidden_size"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_groups:
            bad(f"hidden_size {self.hidden_size} not divisible by num_groups {self.num_groups}")
        if self.pixel_attn_dim % self.pixel_heads:
            bad(f"pixel_attn_hidden_size {self.pixel_attn_dim} not divisible by pixel_num_groups {self.pixel_heads}")
        if self.rope_mode not in ROPE_MODES:
            bad(f"rope_mode must be one of {ROPE_MODES}, got {self.rope_mode!r}")
        if self.lq_gate_type not in GATE_TYPES:
            bad(f"lq_gate_type must be one of {GATE_TYPES}, got {self.lq_gate_type!r}")
        if self.lq_conv_padding_mode not in PADDING_MODES:
            bad(f"lq_conv_padding_mode must be one of {PADDING_MODES}, got {self.lq_conv_padding_mode!r}")
        if self.enable_ed:
            bad("enable_ed=True (encoder-decoder tokens) is not supported: no released PiD checkpoint uses it")
        if self.prediction_type not in ("velocity", "x0"):
            bad(f"prediction_type must be 'velocity' or 'x0', got {self.prediction_type!r}")
        if self.lq_interval < 1:
            bad(f"lq_interval must be >= 1, got {self.lq_interval}")
        if self.lq_latent_channels and self.lq_latent_channels % self.lq_latent_unpatchify_factor**2:
            bad(
                f"lq_latent_channels {self.lq_latent_channels} not divisible by "
                f"lq_latent_unpatchify_factor**2 = {self.lq_latent_unpatchify_factor**2}"
            )
        if self.lq_in_channels and (self.patch_size % self.sr_scale or self.patch_size < self.sr_scale):
            bad(f"RGB LQ branch needs patch_size {self.patch_size} to be a multiple of sr_scale {self.sr_scale}")
        if (self.input_concat_lq or self.residual_lq) and not self.lq_in_channels:
            bad("input_concat_lq / residual_lq need the RGB LQ branch (lq_in_channels > 0)")
        if self.out_conv < 0:
            bad(f"out_conv must be >= 0, got {self.out_conv}")

    # --- derived sizes ---
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_groups

    @property
    def pixel_attn_dim(self) -> int:
        return self.pixel_attn_hidden_size if self.pixel_attn_hidden_size is not None else self.hidden_size

    @property
    def pixel_heads(self) -> int:
        return self.pixel_num_groups if self.pixel_num_groups is not None else self.num_groups

    @property
    def has_lq(self) -> bool:
        return self.lq_in_channels > 0 or self.lq_latent_channels > 0

    @property
    def num_lq_outputs(self) -> int:
        return -(-self.patch_depth // self.lq_interval) if self.has_lq else 0

    @property
    def latent_factor(self) -> int:
        """Output pixels per latent pixel: sr_scale × VAE down factor."""
        return self.sr_scale * self.latent_spatial_down_factor

    @property
    def pixel_in_channels(self) -> int:
        return self.in_channels * (2 if self.input_concat_lq else 1)

    @classmethod
    def from_official(cls, kwargs: dict[str, Any], *, defaults: str = "pidnet") -> PidConfig:
        """Build from official `PidNet(...)` / `PixDiT_T2I(...)` kwargs.

        `defaults="pixeldit_t2i"` applies PixDiT_T2I's own defaults (no LQ branch, original RoPE) for
        keys the kwargs leave out; "pidnet" applies PidNet's.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        # `ed_*`: the official configs' encoder-decoder settings, resolved into the kwargs but inert in the network
        unknown = sorted(k for k in set(kwargs) - known - set(_TRAINING_ONLY) if not k.startswith("ed_"))
        if unknown:
            raise ValueError(f"unknown PiD config keys: {unknown}")
        if kwargs.get("lq_inject_mode", "controlnet") != "controlnet":
            raise ValueError(f"lq_inject_mode must be 'controlnet', got {kwargs['lq_inject_mode']!r}")
        base: dict[str, Any] = {}
        if defaults == "pixeldit_t2i":
            base = dict(rope_mode="original", lq_in_channels=0, lq_latent_channels=0)
        elif defaults == "pidnet":
            base = dict(lq_in_channels=3)  # PidNet's own default; every released config overrides it to 0
        else:
            raise ValueError(f"defaults must be 'pidnet' or 'pixeldit_t2i', got {defaults!r}")
        # The backbone sizes default to PixDiT_T2I's signature when a fixture leaves them out.
        base.update(
            num_groups=16, hidden_size=1152, pixel_hidden_size=64, pixel_attn_hidden_size=None,
            pixel_num_groups=None, patch_depth=26, txt_embed_dim=4096, txt_max_length=1024,
            lq_interval=1,
        )  # fmt: skip
        base.update({k: v for k, v in kwargs.items() if k in known})
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PidConfig:
        """The inverse of to_dict; unknown keys are refused (a newer file's field would be silently dropped)."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        bad = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise ValueError(f"unknown config field(s) {bad}")
        return cls(**d)
