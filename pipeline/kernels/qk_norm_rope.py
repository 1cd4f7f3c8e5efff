"""QK-RMSNorm and RoPE for q and k in one launch: reads the strided q/k views of the qkv projection once.

Channel pairs (2i, 2i+1) rotate by angle i (the checkpoints' convention); computed in fp32.
Grid axis 1 picks q or k, so both share one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels._common import configs, prune


@triton.jit
def _norm_rope_rows(
    SRC, W, COS, SIN, OUT, rows, n_rows, N, Hh, s_b, s_n, s_h, half, eps,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    pp = tl.arange(0, BLOCK_P)
    pm = pp < half
    h = rows % Hh
    n = (rows // Hh) % N
    b = rows // (Hh * N)
    base = b * s_b + n * s_n + h * s_h
    m = (rows < n_rows)[:, None] & pm[None, :]
    xe = tl.load(SRC + base[:, None] + 2 * pp[None, :], mask=m, other=0.0).to(tl.float32)
    xo = tl.load(SRC + base[:, None] + 2 * pp[None, :] + 1, mask=m, other=0.0).to(tl.float32)
    inv = tl.rsqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / (2 * half) + eps)
    we = tl.load(W + 2 * pp, mask=pm, other=0.0).to(tl.float32)
    wo = tl.load(W + 2 * pp + 1, mask=pm, other=0.0).to(tl.float32)
    xe = xe * inv[:, None] * we[None, :]
    xo = xo * inv[:, None] * wo[None, :]
    c = tl.load(COS + n[:, None] * half + pp[None, :], mask=m, other=0.0)
    s = tl.load(SIN + n[:, None] * half + pp[None, :], mask=m, other=0.0)
    dst = rows[:, None] * (2 * half) + 2 * pp[None, :]
    tl.store(OUT + dst, (xe * c - xo * s).to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + dst + 1, (xe * s + xo * c).to(OUT.dtype.element_ty), mask=m)


CANDIDATES = ([4, 16, 64], [2, 4, 8])  # (rows per program, warps): pruned per row width by _common.prune


@triton.autotune(configs=configs(*CANDIDATES), key=["half"],
                 prune_configs_by=prune(lambda a: 2 * a["BLOCK_P"]))  # fmt: skip
@triton.jit
def _qk_norm_rope_kernel(
    Q, K, WQ, WK, COS, SIN, OQ, OK, n_rows, N, Hh, qs_b, qs_n, qs_h, ks_b, ks_n, ks_h, half, eps,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    if tl.program_id(1) == 0:
        _norm_rope_rows(Q, WQ, COS, SIN, OQ, rows, n_rows, N, Hh, qs_b, qs_n, qs_h, half, eps, BLOCK_P)
    else:
        _norm_rope_rows(K, WK, COS, SIN, OK, rows, n_rows, N, Hh, ks_b, ks_n, ks_h, half, eps, BLOCK_P)


def qk_norm_rope(q, k, q_weight, k_weight, rope, eps: float = 1e-6):
    """q, k [B, N, heads, hd] (any strides with a unit last stride); rope = (cos, sin) [N, hd/2] -> new q, k."""
    B, N, Hh, hd = q.shape
    if k.shape != q.shape or hd % 2:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must match with an even head dim")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos, sin = (r.to(device=q.device, dtype=torch.float32).contiguous() for r in rope)
    oq = torch.empty((B, N, Hh, hd), device=q.device, dtype=q.dtype)
    ok = torch.empty_like(oq)
    n_rows = B * N * Hh
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), 2)  # noqa: E731
    _qk_norm_rope_kernel[grid](
        q, k, q_weight, k_weight, cos, sin, oq, ok, n_rows, N, Hh, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), hd // 2, eps, BLOCK_P=triton.next_power_of_2(hd // 2),
    )  # fmt: skip
    return oq, ok
