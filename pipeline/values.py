"""Checks of plain values that options of every layer share: a seed's range, an options dataclass from a dict.

Below the stages and the generator's options alike (`pipeline.stages.common`, `pipeline.t2i`), so neither imports
the other for them."""

from __future__ import annotations

from dataclasses import fields

from pipeline.errors import BadParameter

SEED_LIMIT = 1 << 63  # seeds are 63-bit: torch generators and our noise keys take them as they are


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise BadParameter(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


def strict_from_dict(cls, d: dict):
    """`cls(**d)` for an options dataclass, refusing unknown fields with their names (BadParameter)."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise BadParameter(f"unknown option(s): {unknown}")
    return cls(**d)
