"""PixelDiT text-to-image: the sampler call the CLI, the job, the endpoint and the golden check share.

The official inference (facts from nv-tlabs/PiD `PixelDiTModel.generate_samples_from_batch`): Gaussian noise
[B, 3, H, W] from the seed, the caption embedding and the negative prompt's embedding (computed once) as the
unconditional branch, multistep DPM-Solver++ (order 2, `time_uniform_flow` with the flow shift) on the velocity
prediction, classifier-free guidance on one [uncond; cond] batch, the sample clamped to [-1, 1].
Our noise comes from a CPU generator seeded per image (batch-independent, the same on every device); the official
script draws its batch from the CUDA generator, so seeds do not give the official script's exact images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from pipeline.errors import BadParameter
from pipeline.model.t2i_sampler import dpm_solver_pp
from pipeline.values import check_seed, strict_from_dict

MAX_STEPS = 200
MAX_PROMPT_CHARS = 4000


def check_prompt(prompt) -> str:
    """A row's prompt, or BadInput: empty, or longer than MAX_PROMPT_CHARS."""
    from pipeline.errors import BadInput

    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInput("empty prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadInput(f"prompt is {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}")
    if not _is_text(prompt):
        raise BadInput("prompt is not valid text (it holds a lone UTF-16 surrogate)")
    return prompt


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@torch.inference_mode()
def generate(net, y: torch.Tensor, y_null: torch.Tensor | None, noise: torch.Tensor, *, steps: int, shift: float,
             cfg_scale: float, order: int = 2, should_stop=None) -> torch.Tensor:  # fmt: skip
    """noise [B, 3, H, W]; y [B, L, D]; y_null [1 or B, L, D] (needed when cfg_scale != 1) -> images in [-1, 1]."""
    B = noise.shape[0]
    dtype = next(net.parameters()).dtype
    if cfg_scale != 1.0:
        if y_null is None:
            raise ValueError("classifier-free guidance needs the negative (unconditional) embedding")
        y = torch.cat([y_null.expand(B, -1, -1), y])  # one batch [uncond; cond], as the official wrapper
    y = y.to(noise.device, dtype)

    def velocity(x, t):
        return net(x.to(dtype), t.to(dtype), y).float()

    out = dpm_solver_pp(
        velocity, noise.float(), steps=steps, shift=shift, cfg_scale=cfg_scale, order=order, should_stop=should_stop
    )
    return out.clamp(-1, 1)


def initial_noise(seed: int, hw: tuple[int, int], device="cpu") -> torch.Tensor:
    """[1, 3, H, W] from the image's own seed: the same image whatever it is batched with, on any device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, 3, *hw, generator=g).to(device)


@dataclass
class GenerateOptions:
    """Per-job (or per-request) text-to-image settings; None: the preset's official default."""

    steps: int | None = None
    shift: float | None = None
    cfg_scale: float | None = None
    size: tuple[int, int] | None = None  # (H, W); multiples of the network's patch size
    negative_prompt: str | None = None
    seed: int = 0
    max_side: int = 4096
    stop_at: int | None = None  # generate-then-decode: the generator's x_t after this many steps goes to PiD

    def __post_init__(self):
        check_seed(self.seed)
        if self.stop_at is not None and (isinstance(self.stop_at, bool) or not isinstance(self.stop_at, int)
                                         or not 1 <= self.stop_at <= MAX_STEPS):  # fmt: skip
            raise BadParameter(f"stop_at must be an integer in 1..{MAX_STEPS}, got {self.stop_at!r}")
        if self.negative_prompt is not None:
            if not isinstance(self.negative_prompt, str) or not _is_text(self.negative_prompt):
                raise BadParameter(f"negative_prompt must be text, got {type(self.negative_prompt).__name__}")
            if len(self.negative_prompt) > MAX_PROMPT_CHARS:
                raise BadParameter(f"negative_prompt is {len(self.negative_prompt):,} characters, over the limit of "
                                   f"{MAX_PROMPT_CHARS:,}")  # fmt: skip
        if self.steps is not None and (not isinstance(self.steps, int) or not 2 <= self.steps <= MAX_STEPS):
            raise BadParameter(f"steps must be an integer in 2..{MAX_STEPS}, got {self.steps!r}")
        if self.shift is not None and not 0.1 <= float(self.shift) <= 100:
            raise BadParameter(f"shift must be in [0.1, 100], got {self.shift}")
        if self.cfg_scale is not None and not 0.0 <= float(self.cfg_scale) <= 50:
            raise BadParameter(f"cfg_scale must be in [0, 50], got {self.cfg_scale}")
        if self.size is not None:
            h, w = (int(v) for v in self.size)
            if min(h, w) < 16 or max(h, w) > self.max_side:
                raise BadParameter(f"size {w}x{h} must be between 16 and {self.max_side} pixels a side")
            self.size = (h, w)

    def resolved(self, preset, defaults: dict | None = None) -> GenerateOptions:
        """Every unset field from the preset's defaults (or `defaults`); the size checked against its patch size."""
        d = defaults if defaults is not None else preset.t2i
        out = replace(
            self,
            steps=self.steps or int(d.get("steps", 50)),
            shift=float(self.shift if self.shift is not None else d.get("shift", 4.0)),
            cfg_scale=float(self.cfg_scale if self.cfg_scale is not None else d.get("cfg_scale", 1.0)),
            size=tuple(self.size or d.get("size", (1024, 1024))),
            negative_prompt=self.negative_prompt
            if self.negative_prompt is not None
            else d.get("negative_prompt") or "",
        )
        if out.stop_at is not None and out.stop_at > out.steps:
            raise BadParameter(f"stop_at {out.stop_at} is past the last of the generator's {out.steps} steps "
                               f"(1..{out.steps})")  # fmt: skip
        p = preset.config.patch_size
        if out.size[0] % p or out.size[1] % p:
            raise BadParameter(f"size {out.size[1]}x{out.size[0]} must be multiples of the patch size {p}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerateOptions:
        return strict_from_dict(cls, d)


GEN_OVERRIDES = ("seed", "steps", "shift", "cfg_scale", "size", "negative_prompt", "stop_at")


def row_options(defaults: GenerateOptions, row: dict) -> GenerateOptions:
    """A row's settings: its `gen` overrides (prompt files, requests) over the defaults; its seed from `gen` or the
    row's own `seed` (the one the upscale of the image uses too)."""
    gen = row.get("gen") or {}
    over = {k: gen[k] for k in GEN_OVERRIDES if gen.get(k) is not None}
    if "seed" not in over and row.get("seed") is not None:
        over["seed"] = row["seed"]
    return replace(defaults, **over) if over else defaults


__all__ = ["generate", "initial_noise", "GenerateOptions", "row_options", "check_prompt", "GEN_OVERRIDES"]
