"""Shared host-side helpers for the Triton kernels: launch configs, broadcast-row mapping."""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


MAX_ELEMS_PER_THREAD = 16  # above this sm_90 may spill (pipeline.kernels.aot: 64 spilled on triton 3.9; 32 spilled
# 208-280 bytes in rms_norm_modulate on triton 3.7.1, the version torch 2.13's CUDA wheel requires)
MAX_CONFIGS = 4  # configs tried per autotune key: each one is a compile on a replica's first request


def configs(block_rows: list[int], warps: list[int]) -> list[triton.Config]:
    """Autotune candidates; one config under the CPU interpreter (tests), where tuning only costs time.

    Which candidates a launch may try depends on the row width: `prune(row_elems)` keeps at most MAX_CONFIGS of
    them, each holding at most MAX_ELEMS_PER_THREAD elements per thread.
    """
    if INTERPRET:
        return [
            triton.Config({"BLOCK_R": max(block_rows)}, num_warps=warps[0])
        ]  # fewest programs: fastest to interpret
    return all_configs(block_rows, warps)


def all_configs(block_rows: list[int], warps: list[int]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_R": r}, num_warps=w) for r in block_rows for w in warps]


def elems_per_thread(cfg: triton.Config, row_elems: int) -> float:
    return cfg.kwargs["BLOCK_R"] * row_elems / (cfg.num_warps * 32)


def tuning_space(candidates: list[triton.Config], row_elems: int) -> list[triton.Config]:
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
