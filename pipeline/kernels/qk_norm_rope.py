"""QK-RMSNorm and RoPE for q and k in one launch: reads the strided q/k views of the qkv projection once.

Channel pairs (2i, 2i+1) rotate by angle i (the checkpoints' convention); computed in fp32.
Grid axis 1 picks q or k, so both share one launch. Order: torch reference, kernels, host wrapper, the `Op` record.
"""

from __future__ import annotations

import torch

from pipeline.kernels._common import HAVE_TRITON, Op, configs, prune
from pipeline.kernels.rms_norm_modulate import rms_norm, rms_norm_modulate


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate x [B, N, heads, head_dim] by rope ([N, head_dim/2] cos, sin); adjacent pairs; fp32."""
    cos, sin = (r[None, :, None, :].to(x.device) for r in rope)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # -> [B, N, heads, head_dim/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)


def reference(q, k, q_weight, k_weight, rope, eps: float = 1e-6):
    """Per-head RMSNorm of q and k, then RoPE (skipped when rope is None)."""
    q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    if rope is None:
        return q, k
    return apply_rope(q, rope), apply_rope(k, rope)


CANDIDATES = ([4, 16, 64], [2, 4, 8])  # (rows per program, warps): pruned per row width by _common.prune

if HAVE_TRITON:
    import triton
    import triton.language as tl

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


def _fused(q, k, q_weight, k_weight, rope, eps=1e-6):
    if rope is None:  # no rotation: the plain norm kernel
        return rms_norm_modulate(q, q_weight, eps=eps), rms_norm_modulate(k, k_weight, eps=eps)
    return qk_norm_rope(q, k, q_weight, k_weight, rope, eps)


def tune_key(q, k, q_weight, k_weight, rope, eps=1e-6) -> tuple:
    from pipeline.kernels.rms_norm_modulate import tune_key as norm_key

    if rope is None:
        return norm_key(q, q_weight)
    tensors = (q, k, q_weight, k_weight, rope[0].float(), rope[1].float(), q, q)
    return ("qk_norm_rope", q.shape[-1] // 2, *(str(t.dtype) for t in tensors))


def _cases(cfg, H, W, device, dtype):
    from pipeline.model.math import rope_2d

    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    p, D = cfg.patch_size, cfg.hidden_size
    gh, gw = H // p, W // p
    hd = D // cfg.num_groups
    q, k, _ = rnd(1, gh * gw, 3 * D).view(1, gh * gw, 3, cfg.num_groups, hd).unbind(2)  # strided views of qkv
    wq, wk = rnd(hd), rnd(hd)
    rope = tuple(r.to(device) for r in rope_2d(hd, gh, gw))
    return [("qk_norm_rope", lambda: qk_norm_rope(q, k, wq, wk, rope), lambda: reference(q, k, wq, wk, rope))]


def _aot_cases(p2):
    for hd in (128, 64):  # head dims
        yield {"BLOCK_P": p2(hd // 2)}, 2 * p2(hd // 2)


OP = Op("qk_norm_rope", reference={"qk_norm_rope": reference}, fused={"qk_norm_rope": _fused},
        key={"qk_norm_rope": tune_key}, kernel="_qk_norm_rope_kernel", candidates=CANDIDATES,
        aot_cases=_aot_cases, cases=_cases)  # fmt: skip
