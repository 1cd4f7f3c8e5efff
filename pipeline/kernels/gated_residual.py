"""Gated residual add: x + gate · y, gate per token ([B, 1, D]) or per pixel (shaped like x, strided)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels._common import check_last_dim, configs, mod_rows, prune, rows_of

CANDIDATES = ([1, 4, 16, 64, 256], [1, 4, 8])  # (rows per program, warps): pruned per row width by _common.prune


@triton.autotune(configs=configs(*CANDIDATES), key=["D", "n_rows"],
                 prune_configs_by=prune(lambda a: a["BLOCK_D"]))  # fmt: skip
@triton.jit
def _gated_residual_kernel(
    X, G, Y, OUT, n_rows, D, x_stride, g_stride, y_stride, group, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x = tl.load(X + rows[:, None] * x_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y = tl.load(Y + rows[:, None] * y_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + (rows // group)[:, None] * g_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * D + cols[None, :], (x + g * y).to(OUT.dtype.element_ty), mask=m)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    D = x.shape[-1]
    check_last_dim("gated_residual", D)
    if y.shape != x.shape:
        y = y.expand_as(x)
    xr, xs = rows_of(x)
    yr, ys = rows_of(y)
    g, gs, group = mod_rows(gate, x)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n_rows = x.numel() // D
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)  # noqa: E731
    _gated_residual_kernel[grid](xr, g, yr, out, n_rows, D, xs, gs, ys, group, BLOCK_D=triton.next_power_of_2(D))
    return out
