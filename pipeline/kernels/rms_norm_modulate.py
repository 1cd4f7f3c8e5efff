"""Fused RMSNorm + AdaLN modulate: norm(x)·w·(1 + scale) + shift, per token or per pixel, in one pass.

Eager PyTorch reads x twice and writes three temporaries; this reads x, w, shift, scale once and
writes the result once. Rows are processed in blocks of BLOCK_R so that the PiT case (rows of 16)
fills the GPU as well as the patch case (rows of 1536).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels._common import check_last_dim, configs, mod_rows, prune, rows_of

CANDIDATES = ([1, 4, 16, 64, 256], [1, 4, 8])  # (rows per program, warps): pruned per row width by _common.prune


@triton.autotune(configs=configs(*CANDIDATES), key=["D", "HAS_MOD", "n_rows"],
                 prune_configs_by=prune(lambda a: a["BLOCK_D"]))  # fmt: skip
@triton.jit
def _rms_norm_modulate_kernel(
    X, W, SHIFT, SCALE, OUT, n_rows, D, x_stride, shift_stride, scale_stride, group, eps,
    HAS_MOD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # int64: 4096² images × 16 channels pass 2**31 elements
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask, cmask = rows < n_rows, cols < D
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * x_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = x * inv[:, None] * w[None, :]
    if HAS_MOD:
        mrow = rows // group
        sc = tl.load(SCALE + mrow[:, None] * scale_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + mrow[:, None] * shift_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = y * (1.0 + sc) + sh
    tl.store(OUT + rows[:, None] * D + cols[None, :], y.to(OUT.dtype.element_ty), mask=m)


def rms_norm_modulate(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:  # fmt: skip
    """x [..., D]; shift/scale shaped like x or [B, 1, D] for x [B, L, D]; None for a plain RMSNorm."""
    D = x.shape[-1]
    check_last_dim("rms_norm_modulate", D)
    xr, x_stride = rows_of(x)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n_rows = x.numel() // D
    if shift is None:
        sh, sh_stride, sc, sc_stride, group, has_mod = xr, 0, xr, 0, 1, False
    else:
        sh, sh_stride, group = mod_rows(shift, x)
        sc, sc_stride, group2 = mod_rows(scale, x)
        if group2 != group:
            sc, sc_stride, _ = mod_rows(scale.expand_as(x).contiguous(), x)
            sh, sh_stride, group = mod_rows(shift.expand_as(x).contiguous(), x)
        has_mod = True
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)  # noqa: E731
    _rms_norm_modulate_kernel[grid](
        xr, weight, sh, sc, out, n_rows, D, x_stride, sh_stride, sc_stride, group, eps,
        HAS_MOD=has_mod, BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
    return out
