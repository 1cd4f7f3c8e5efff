"""What every stage shares: the per-request options, failure marking, timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

from pipeline.errors import BadParameter, kind_of
from pipeline.imageio import DEFAULT_MAX_PIXELS, ImageError
from pipeline.tiling import DEFAULT_MAX_OUTPUT_SIDE, DEFAULT_OVERLAP


@dataclass
class UpscaleOptions:
    """Per-job (or per-request) settings; a row may override caption, seed and degrade_sigma."""

    scale: float | None = None  # None: the preset's native factor; others resize the native result (Lanczos)
    steps: int = 4
    seed: int = 0
    caption: str = ""
    degrade_sigma: float = 0.0
    sampler: str = "sde"  # "sde" (official) | "ode"
    tile: int | None = None  # tile side in output pixels; None: the preset's envelope
    overlap: int = DEFAULT_OVERLAP  # latent pixels
    fusion: bool = True  # average overlapping x0 estimates every step (all tiles of an image in one process)
    format: str | None = None  # None: keep the input's format (PNG when it has alpha)
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_output_side: int = DEFAULT_MAX_OUTPUT_SIDE

    def __post_init__(self):
        check_seed(self.seed)
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 4:
            raise BadParameter(f"steps must be an integer in 1..4, got {self.steps!r}")
        if not 0.0 <= float(self.degrade_sigma) <= 1.0:
            raise BadParameter(f"degrade_sigma must be in [0, 1], got {self.degrade_sigma}")
        if self.scale is not None and not 0.25 <= float(self.scale) <= 16:
            raise BadParameter(f"scale must be in [0.25, 16], got {self.scale}")
        if self.sampler not in ("sde", "ode"):
            raise BadParameter(f"sampler must be 'sde' or 'ode', got {self.sampler!r}")
        if not 1 <= int(self.quality) <= 100:
            raise BadParameter(f"quality must be in 1..100, got {self.quality}")
        if self.tile is not None and (not isinstance(self.tile, int) or self.tile < 16):
            raise BadParameter(f"tile (--tile) must be an integer >= 16 output pixels, got {self.tile!r}")
        if not isinstance(self.overlap, int) or self.overlap < 0:
            raise BadParameter(f"overlap (--overlap) must be an integer >= 0 latent pixels, got {self.overlap!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UpscaleOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BadParameter(f"unknown option(s): {unknown}")
        return cls(**d)


SEED_LIMIT = 1 << 63  # seeds are 63-bit: torch generators and our noise keys take them as they are


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise BadParameter(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


USER_ERRORS = (ImageError, ValueError)


def failed(row: dict, stage: str, err: BaseException, kind: str | None = None) -> dict:
    """Mark a row failed at `stage`: the message for people, the kind (pipeline.errors) for exit/HTTP codes."""
    row = {k: v for k, v in row.items() if k not in ("bytes", "image", "latent", "tiles", "lq_image")}
    row["status"] = "failed"
    row["error"] = f"{stage}: {err}"
    row["error_kind"] = kind or kind_of(err)
    return row


def is_failed(row: dict) -> bool:
    return row.get("status") == "failed"


@contextmanager
def timed(row: dict, stage: str):
    t0 = time.perf_counter()
    yield
    row.setdefault("timings", {})[stage] = round(time.perf_counter() - t0, 4)
