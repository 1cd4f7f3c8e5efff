"""Shared pieces of the ops: the `Op` record each op file ends with, launch configs, autotune keys, row mapping.

Importable without triton (the CPU install has none): the op files define their kernels only when it is present.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

try:
    import triton
except ImportError:  # the torch references still work
    triton = None

HAVE_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Op:
    """One op: its `Ops` methods as torch references and (where triton is present) as fused kernels.

    key: the autotune key the launch would use, from the method's arguments (no launch, any device) — the same
    tuple the kernel's `triton.autotune(key=...)` sees, plus the tensors' dtypes as Triton adds them.
    kernel/candidates/aot_cases: what `pipeline.kernels.aot` compiles ahead of time (kernel name, constexprs, row
    elements). cases(cfg, H, W, device, dtype): (label, fused, reference) closures at the network's shapes.
    """

    name: str
    reference: dict[str, Callable]
    fused: dict[str, Callable] = field(default_factory=dict)
    key: dict[str, Callable] = field(default_factory=dict)
    kernel: str | None = None
    candidates: tuple | None = None
    aot_cases: Callable | None = None
    cases: Callable | None = None


ROW_BUCKETS = (64, 4096, 1 << 18)  # rows per launch: < 64, < 4096, < 262144, more (patch tokens of any 2K tile
# batch of 1–4 fall in one bucket, pixel rows in the last)


def row_bucket(n_rows: int) -> int:
    """The coarse row-count bucket the row kernels key their autotuning on (the row width is the other key)."""
    return sum(n_rows >= b for b in ROW_BUCKETS)


MAX_ELEMS_PER_THREAD = 8  # above this sm_90 may spill, and the triton that runs is the GPU machine's, not ours
# (pipeline.kernels.aot): at 16 elements a thread triton 3.6 spilled 16 bytes in rms_norm_modulate (rows of 128,
# BLOCK_R 16, 4 warps: 16 values each of x, shift and scale a thread, with their 64-bit addresses) where 3.7.1 did
# not; at 32, 3.7.1 spilled 208-280 bytes there; at 64, 3.9 spilled. 8 halves the pressure that spilled on 3.6.
MAX_CONFIGS = 4  # configs tried per autotune key: each one is a compile on a replica's first request


def configs(block_rows: list[int], warps: list[int]) -> list:
    """Autotune candidates; one config under the CPU interpreter (tests), where tuning only costs time.

    Which candidates a launch may try depends on the row width: `prune(row_elems)` keeps at most MAX_CONFIGS of
    them, each holding at most MAX_ELEMS_PER_THREAD elements per thread.
    """
    if INTERPRET:
        return [
            triton.Config({"BLOCK_R": max(block_rows)}, num_warps=warps[0])
        ]  # fewest programs: fastest to interpret
    return all_configs(block_rows, warps)


def all_configs(block_rows: list[int], warps: list[int]) -> list:
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r in block_rows for w in warps]


def elems_per_thread(cfg, row_elems: int) -> float:
    return cfg.kwargs["BLOCK_R"] * row_elems / (cfg.num_warps * 32)


def tuning_space(candidates: list, row_elems: int) -> list:
    """The configs a launch with rows of `row_elems` elements may try: none over MAX_ELEMS_PER_THREAD, the ones
    with the most work per thread first (fewest programs), at most MAX_CONFIGS; the lightest one if none fits."""
    fit = [c for c in candidates if elems_per_thread(c, row_elems) <= MAX_ELEMS_PER_THREAD]
    if not fit:
        return [min(candidates, key=lambda c: elems_per_thread(c, row_elems))]
    return sorted(fit, key=lambda c: -elems_per_thread(c, row_elems))[:MAX_CONFIGS]


def prune(row_elems):
    """`prune_configs_by` for triton.autotune: row_elems(args) -> elements of one row held by a program."""

    def early_config_prune(candidates, named_args, **kwargs):
        return tuning_space(candidates, row_elems({**named_args, **kwargs}))

    return {"early_config_prune": early_config_prune}


def rows_of(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View t [..., D] as rows of D with one row stride (copying only when the strides do not allow it)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    for k in range(t.ndim - 2):
        if t.stride(k) != t.stride(k + 1) * t.shape[k + 1]:
            t = t.contiguous()
            break
    return t, (t.stride(-2) if t.ndim >= 2 else t.shape[-1])


def mod_rows(mod: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(base, row stride, group) so that x row r is modulated by mod row r // group.

    Handles the two layouts PiD uses: per-pixel (mod shaped like x, e.g. a strided chunk of the
    modulation output) and per-token ([B, 1, D] broadcast over the L tokens of x [B, L, D]).
    """
    if mod.shape == x.shape:
        base, stride = rows_of(mod)
        return base, stride, 1
    if x.ndim == 3 and mod.ndim == 3 and mod.shape[0] == x.shape[0] and mod.shape[1] == 1 and mod.stride(-1) == 1:
        return mod, mod.stride(0), x.shape[1]
    base, stride = rows_of(mod.expand_as(x))
    return base, stride, 1


def check_last_dim(name: str, d: int, limit: int = 65536) -> None:
    if d > limit:
        raise ValueError(f"{name}: last dimension {d} exceeds the kernel's block limit {limit}")
