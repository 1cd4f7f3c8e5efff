"""The text-to-image settings (PixelDiT, and the generators whose latents PiD decodes), declared once as the upscale
options are (`pipeline.options.Opt`): each field says its type, range, help, command-line flag and whether a prompt
line or request may set it. `pidray generate`'s arguments, a prompt file's fields, /v1/generate's JSON fields and
their OpenAPI description, and the row overrides are all made from this declaration: a new setting is its field here
plus the code that reads it.

Imports nothing heavy (no torch): `pidray generate --help` builds its parser from it.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, replace

from pipeline.errors import BadParameter
from pipeline.options import Opt, check, declared
from pipeline.values import SEED_LIMIT, strict_from_dict

MAX_STEPS = 200
MAX_PROMPT_CHARS = 4000
SIZE = tuple  # the kind of a "WIDTHxHEIGHT" setting, held as (H, W)


def _opt(default, kind, help, **kw):
    return field(default=default, metadata={"opt": Opt(kind, help, row=kw.pop("row", True), **kw)})


@dataclass
class GenerateOptions:
    """Per-job (or per-request) text-to-image settings; None: the model's official default."""

    steps: int | None = _opt(None, int, "sampler steps (default: the model's)", flags=("--steps",), lo=2, hi=MAX_STEPS)
    shift: float | None = _opt(None, float, "flow shift (default: the model's)", flags=("--shift",), lo=0.1, hi=100.0)
    cfg_scale: float | None = _opt(None, float, "classifier-free guidance, 1: off (default: the model's)",
                                   flags=("--cfg-scale",), lo=0.0, hi=50.0)  # fmt: skip
    size: tuple[int, int] | None = _opt(None, SIZE, "WIDTHxHEIGHT, multiples of 16 (default: the model's)",
                                        flags=("--size",), metavar="WxH")  # fmt: skip
    negative_prompt: str | None = _opt(None, str, "what guidance steers away from (default: the model's)",
                                       flags=("--negative-prompt",))  # fmt: skip
    seed: int = _opt(0, int, "the image's seed", flags=("--seed",), lo=0, hi=SEED_LIMIT - 1)
    max_side: int = _opt(4096, int, "the longest side a size may ask for", lo=16, hi=1 << 16, row=False)
    stop_at: int | None = _opt(None, int, "hand PiD the generator's x_t after K of its steps, at that step's sigma "
                               "(skips the rest)", flags=("--stop-at",), lo=1, hi=MAX_STEPS, metavar="K")  # fmt: skip

    def __post_init__(self):
        for name, o in GEN_OPTS.items():
            if o.kind is not SIZE:
                setattr(self, name, check(name, getattr(self, name), GEN_OPTS, GEN_DEFAULTS))
        if self.negative_prompt is not None:
            check_text(self.negative_prompt, "negative_prompt")
        if self.size is not None:
            whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
            if not isinstance(self.size, (tuple, list)) or len(self.size) != 2 or not all(map(whole, self.size)):
                raise BadParameter(f"size must be (height, width) whole numbers, got {str(self.size)[:60]}")
            h, w = (int(v) for v in self.size)
            if min(h, w) < 16 or max(h, w) > self.max_side:
                raise BadParameter(f"size {w}x{h} must be between 16 and {self.max_side} pixels a side")
            self.size = (h, w)

    def resolved(self, preset, defaults: dict | None = None) -> GenerateOptions:
        """Every unset field from the preset's defaults (or `defaults`: a generator's, with the multiple its sides
        must be); the size checked against it (else the network's patch size)."""
        if defaults is None and self.stop_at is not None:  # a text-to-image preset runs all its steps
            raise BadParameter("stop_at is for a generator's latent (pidray generate --with MODEL; an endpoint's "
                               'generate={"with": ...}), not a text-to-image preset')  # fmt: skip
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
        p = int(d.get("multiple", preset.config.patch_size))
        if out.size[0] % p or out.size[1] % p:
            what = f"of {p} (the sides {d['name']} makes)" if "multiple" in d else f"of the patch size {p}"
            raise BadParameter(f"size {out.size[1]}x{out.size[0]} must be multiples {what}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerateOptions:
        return strict_from_dict(cls, d)


GEN_OPTS, GEN_DEFAULTS = declared(GenerateOptions)
GEN_OVERRIDES: tuple[str, ...] = tuple(name for name, o in GEN_OPTS.items() if o.row)  # a prompt line's, a request's


def check_text(value, name: str) -> str:
    """A prompt-like text: a string of real text (no lone UTF-16 surrogate) of at most MAX_PROMPT_CHARS."""
    if not isinstance(value, str):
        raise BadParameter(f"{name} must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadParameter(f"{name} is not valid text (it holds a lone UTF-16 surrogate)") from None
    if len(value) > MAX_PROMPT_CHARS:
        raise BadParameter(f"{name} is {len(value):,} characters, over the limit of {MAX_PROMPT_CHARS:,}")
    return value


def row_options(defaults: GenerateOptions, row: dict) -> GenerateOptions:
    """A row's settings: its `gen` overrides (prompt files, requests) over the defaults; its seed from `gen` or the
    row's own `seed` (the one the upscale of the image uses too)."""
    gen = row.get("gen") or {}
    over = {k: gen[k] for k in GEN_OVERRIDES if gen.get(k) is not None}
    if "seed" not in over and row.get("seed") is not None:
        over["seed"] = row["seed"]
    return replace(defaults, **over) if over else defaults


__all__ = ["GEN_DEFAULTS", "GEN_OPTS", "GEN_OVERRIDES", "GenerateOptions", "MAX_PROMPT_CHARS", "MAX_STEPS",
           "check_text", "row_options"]  # fmt: skip
