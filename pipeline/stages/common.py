"""What every stage shares: the per-request options, failure marking, timing."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace

from pipeline.errors import BadParameter, is_number, kind_of
from pipeline.imageio import DEFAULT_MAX_PIXELS
from pipeline.tiling import DEFAULT_MAX_OUTPUT_SIDE


@dataclass
class UpscaleOptions:
    """Per-job (or per-request) settings; a row may override caption, seed and degrade_sigma."""

    scale: float | None = None  # None: the preset's native factor; others resize the native result (Lanczos)
    steps: int | None = None  # None: the preset's default_steps (4 distilled, 25 undistilled, 1 for `small`)
    cfg_scale: float | None = None  # guidance scale of the undistilled presets; None: the preset's (5)
    shift: float | None = None  # flow shift of the undistilled presets; None: the preset's (dynamic: by output size)
    seed: int = 0
    caption: str = ""
    degrade_sigma: float = 0.0
    sampler: str = "sde"  # "sde" (official) | "ode"
    ensemble: bool | None = None  # the shifted-grid ensemble; None: the preset's (on for `small`, ~2x work)
    tile: int | None = None  # tile side in output pixels; None: the preset's envelope
    overlap: int | None = None  # latent pixels; None: the preset's tile_overlap
    fusion: bool = True  # average overlapping x0 estimates every step (all tiles of an image in one process)
    tile_buckets: bool = False  # every tile one of six fixed shapes per preset (few shapes, more pixels diffused)
    format: str | None = None  # None: keep the input's format (PNG when it has alpha)
    quality: int = 95
    background: str = "white"  # what a transparent image is flattened onto for a format without alpha (JPEG)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_output_side: int = DEFAULT_MAX_OUTPUT_SIDE

    def __post_init__(self):
        check_seed(self.seed)
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS
        ):
            raise BadParameter(f"steps must be an integer in 1..{MAX_STEPS}, got {self.steps!r}")
        self.cfg_scale = _number("cfg_scale", self.cfg_scale, 0.0, 50.0)
        self.shift = _number("shift", self.shift, 0.1, 100.0)
        if not 0.0 <= float(self.degrade_sigma) <= 1.0:
            raise BadParameter(f"degrade_sigma must be in [0, 1], got {self.degrade_sigma}")
        if self.scale is not None and not 0.25 <= float(self.scale) <= 16:
            raise BadParameter(f"scale must be in [0.25, 16], got {self.scale}")
        if self.sampler not in ("sde", "ode"):
            raise BadParameter(f"sampler must be 'sde' or 'ode', got {self.sampler!r}")
        if not 1 <= int(self.quality) <= 100:
            raise BadParameter(f"quality must be in 1..100, got {self.quality}")
        parse_color(self.background)
        if self.tile is not None and (not isinstance(self.tile, int) or self.tile < 16):
            raise BadParameter(f"tile (--tile) must be an integer >= 16 output pixels, got {self.tile!r}")
        if self.overlap is not None and (not isinstance(self.overlap, int) or self.overlap < 0):
            raise BadParameter(f"overlap (--overlap) must be an integer >= 0 latent pixels, got {self.overlap!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UpscaleOptions:
        return strict_from_dict(cls, d)


MAX_STEPS = 200  # sampler steps a job or request may ask for (distilled presets: at most their schedule's)


def _number(name: str, value, lo: float, hi: float) -> float | None:
    """An optional finite number in [lo, hi] (bools and strings refused), as a float; BadParameter otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadParameter(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    if not is_number(value) or not lo <= value <= hi:
        raise BadParameter(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def strict_from_dict(cls, d: dict):
    """`cls(**d)` for an options dataclass, refusing unknown fields with their names (BadParameter)."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise BadParameter(f"unknown option(s): {unknown}")
    return cls(**d)


SEED_LIMIT = 1 << 63  # seeds are 63-bit: torch generators and our noise keys take them as they are


def parse_size(value) -> tuple[int, int]:
    """A size as users write it — "WIDTHxHEIGHT", or [width, height] — to (H, W); BadParameter otherwise."""
    try:
        w, h = (int(v) for v in (value.lower().split("x") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise BadParameter(f"size must be WIDTHxHEIGHT, e.g. 2048x1536, got {value!r}") from None
    if w < 1 or h < 1:
        raise BadParameter(f"sizes must be positive, got {value!r}")
    return h, w


def parse_color(value) -> tuple[int, int, int]:
    """A colour as users write it (`white`, `#202020`, `rgb(32,32,32)`: any name or form PIL knows) -> (r, g, b)."""
    from PIL import ImageColor

    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise BadParameter(f"background must be a colour such as white, black or #202020, got {value!r}")
    try:
        rgb = ImageColor.getrgb(value.strip())
    except ValueError:
        raise BadParameter(f"background must be a colour such as white, black or #202020, got {value!r}") from None
    return tuple(rgb[:3])


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise BadParameter(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


# The options a row (a job's row, a request's parameters) may set over the defaults, with their types: declared
# here only; the typed rows (`stages.rows.Overrides`) and the endpoint's parameters are made from it.
OVERRIDES = {"seed": int, "caption": str, "degrade_sigma": float, "steps": int, "cfg_scale": float, "shift": float,
             "scale": float, "format": str, "quality": int, "background": str}  # fmt: skip
ROW_OVERRIDES = tuple(OVERRIDES)


def resolve(defaults: UpscaleOptions, row: dict) -> UpscaleOptions:
    """The row's options: the defaults with the row's overrides, validated once, where the row enters."""
    over = {k: row[k] for k in ROW_OVERRIDES if row.get(k) is not None}
    return replace(defaults, **over) if over else defaults


def options_of(row: dict, defaults: UpscaleOptions) -> UpscaleOptions:
    """What a stage reads: the options resolved where the row entered (`opts`), else resolved now."""
    return row.get("opts") or resolve(defaults, row)


def failed(row: dict, stage: str, err: BaseException, kind: str | None = None) -> dict:
    """Mark a row failed at `stage`: the message for people, the kind (pipeline.errors) for exit/HTTP codes."""
    row = {k: v for k, v in row.items() if k not in ("bytes", "image", "latent", "pixels", "output", "lq_image")}
    row.update(getattr(err, "known", None) or {})  # what the stage had learnt before it failed (the input's size)
    row["status"] = "failed"
    row["error"] = f"{stage}: {err}"
    row["error_kind"] = kind or kind_of(err)
    return row


def is_failed(row: dict) -> bool:
    return row.get("status") == "failed"


def _with_time(row: dict, stage: str, seconds: float) -> dict:
    if not is_failed(row):
        row = {**row, "timings": {**row.get("timings", {}), stage: round(seconds, 4)}}
    return row


def run_stage(stage, name: str, rows: list[dict]) -> list[dict]:
    """The one failure envelope every driver uses (the local loop, Ray Data, Serve).

    Failed rows pass through untouched; the others go through `stage.process_batch` in one call when the stage
    takes batches, else `stage.process` one by one. Each row gets its time; an exception costs only its own row:
    a batch that raises is run again one row at a time, so one bad row never fails its batch-mates. KeyboardInterrupt
    and other BaseExceptions are not caught.
    """
    out = list(rows)
    live = [i for i, r in enumerate(rows) if not is_failed(r)]
    batch = getattr(stage, "process_batch", None)
    if batch is not None and len(live) > 1:
        t0 = time.perf_counter()
        try:
            results = batch([rows[i] for i in live])
        except Exception:
            results = None  # isolate below
        if results is not None:
            dt = time.perf_counter() - t0
            for i, r in zip(live, results):  # each row its share of the call: its own `work_share`, else equal
                share = r.pop("work_share", None) if isinstance(r, dict) else None
                out[i] = _with_time(r, name, dt * (share if share is not None else 1 / len(live)))
            return out
    for i in live:
        t0 = time.perf_counter()
        try:
            r = stage.process(rows[i])
            if isinstance(r, dict):
                r.pop("work_share", None)  # a row alone has the whole call
            out[i] = _with_time(r, name, time.perf_counter() - t0)
        except Exception as e:  # a bad input, or a bug that must cost one row, not the job
            out[i] = failed(rows[i], name, e)
    return out


class Cancellable:
    """For model stages that serve requests: `cancel(request_id)` (called from another thread when a caller goes
    away) and `_gone(row)` (cancelled, or past its deadline), checked between steps of the stage's work."""

    cancelled: dict[str, None]  # request ids whose callers went away (oldest first, capped); set in __init__

    def cancel(self, request_id: str) -> None:
        """The caller of `request_id` went away: its work stops at the next step (called from another thread)."""
        self.cancelled[request_id] = None
        while len(self.cancelled) > 10_000:  # ids cancelled after their batch ended
            self.cancelled.pop(next(iter(self.cancelled)), None)

    def _gone(self, row: dict) -> bool:
        return row.get("request_id") in self.cancelled or time.time() > row.get("deadline", float("inf"))


def sampler_steps(preset, options: UpscaleOptions) -> int:
    """The sampler steps these options ask of this preset: theirs, or the preset's default_steps. BadParameter for
    what the preset's sampler cannot do: more steps than a distilled schedule has, or guidance settings on it."""
    steps = options.steps or preset.default_steps
    if preset.sampler == "guided":
        return steps
    from pipeline.model.sampler import DISTILLED_T

    most = len(DISTILLED_T) - 1
    if steps > most:
        raise BadParameter(f"steps must be in 1..{most} for the distilled preset {preset.name}, got {steps}")
    given = [k for k in ("cfg_scale", "shift") if getattr(options, k) is not None]
    if given:
        raise BadParameter(f"{' and '.join(given)} apply to the undistilled presets (guided sampling); "
                           f"{preset.name} is distilled and takes neither")  # fmt: skip
    return steps


def guidance_for(preset, options: UpscaleOptions, out_hw: tuple[int, int]):
    """A guided preset's resolved settings for an output of out_hw pixels: steps, guidance scale and flow shift
    (the options', else the preset's; a shift of None is the official dynamic rule for that size)."""
    from pipeline.model.guided import Guidance, dynamic_shift

    g = preset.guidance
    shift = options.shift if options.shift is not None else g.get("shift")
    if shift is None:
        shift = dynamic_shift(*out_hw, float(g.get("base_shift", 6.0)), int(g.get("base_size", 2048)))
    cfg = options.cfg_scale if options.cfg_scale is not None else float(g.get("cfg_scale", 1.0))
    return Guidance(sampler_steps(preset, options), cfg, float(shift))


def ensemble_shift(preset, options: UpscaleOptions) -> int:
    """The shifted-grid ensemble's shift in output pixels for these options (0: off); BadParameter when asked of a
    model that cannot use it."""
    from pipeline.model.network import check_shift

    if options.ensemble is False or (options.ensemble is None and not preset.shift_ensemble):
        return 0
    shift = preset.shift_ensemble or preset.config.patch_size // 2
    try:
        check_shift(preset.config, shift)
    except ValueError as e:
        raise BadParameter(f"ensemble: {e}; preset {preset.name} runs without it (--no-ensemble)") from None
    return shift


def work_factor(preset, options: UpscaleOptions, tile_hw: tuple[int, int]) -> float:
    """Pixels the network runs on per tile and step, relative to a plain pass: the ensemble adds its shifted pass,
    `shift` pixels larger on every side; guidance runs the network twice (with and without the caption)."""
    if preset.sampler == "guided":
        return float(guidance_for(preset, options, tile_hw).forwards_per_step)
    s = ensemble_shift(preset, options)
    h, w = tile_hw
    return 1.0 + (h + 2 * s) * (w + 2 * s) / (h * w) if s else 1.0
