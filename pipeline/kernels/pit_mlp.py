"""The whole PiT MLP sub-block per pixel in one kernel: x + gate · fc2(gelu(fc1(norm(x)·w·(1+scale)+shift))).

Each pixel is a row of `pixel_dim` (16 in the released model); the 4×-wide hidden activation
lives only in registers, never in memory. The two tiny matmuls run as tl.dot on blocks of
BLOCK_R pixels (padded to 16 so tensor cores apply). Order: torch reference, kernel, host wrapper, the `Op` record.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.kernels._common import HAVE_TRITON, INTERPRET, Op, configs, mod_rows, prune, rows_of
from pipeline.kernels.gated_residual import reference as gated_residual
from pipeline.kernels.rms_norm_modulate import norm_modulate


def reference(x, norm_weight, shift, scale, gate, fc1_w, fc1_b, fc2_w, fc2_b, eps: float = 1e-6) -> torch.Tensor:
    """PiT MLP sub-block: x + gate · fc2(gelu(fc1(AdaLN(x))))."""
    h = F.linear(norm_modulate(x, norm_weight, shift, scale, eps), fc1_w, fc1_b)
    return gated_residual(x, gate, F.linear(F.gelu(h), fc2_w, fc2_b))


CANDIDATES = ([16, 64, 128, 256], [2, 4, 8])  # (rows per program, warps): pruned per row width by _common.prune

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, bt, IEEE: tl.constexpr):
        """a @ bt in fp32: exact fp32 products (IEEE), or in bt's dtype on the tensor cores."""
        if IEEE:
            out = tl.dot(a, bt.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a.to(bt.dtype), bt).to(tl.float32)
        return out

    @triton.autotune(configs=configs(*CANDIDATES), key=["C", "H"],
                     prune_configs_by=prune(lambda a: a["BLOCK_C"] + a["BLOCK_H"]))  # fmt: skip
    @triton.jit
    def _pit_mlp_kernel(
        X, NW, SHIFT, SCALE, GATE, W1, B1, W2, B2, OUT, n_rows, C, H, x_stride, sh_stride, sc_stride, g_stride, eps,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        cc = tl.arange(0, BLOCK_C)
        hh = tl.arange(0, BLOCK_H)
        cm, hm = cc < C, hh < H
        m = (rows < n_rows)[:, None] & cm[None, :]
        x = tl.load(X + rows[:, None] * x_stride + cc[None, :], mask=m, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
        nw = tl.load(NW + cc, mask=cm, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + rows[:, None] * sc_stride + cc[None, :], mask=m, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + rows[:, None] * sh_stride + cc[None, :], mask=m, other=0.0).to(tl.float32)
        xm = x * inv[:, None] * nw[None, :] * (1.0 + sc) + sh  # padded columns stay 0
        w1t = tl.load(W1 + hh[None, :] * C + cc[:, None], mask=cm[:, None] & hm[None, :], other=0.0)  # [C, H] = fc1ᵀ
        b1 = tl.load(B1 + hh, mask=hm, other=0.0).to(tl.float32)
        h = _dot(xm, w1t, IEEE) + b1[None, :]
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))  # exact GELU, as nn.GELU()
        w2t = tl.load(W2 + cc[None, :] * H + hh[:, None], mask=hm[:, None] & cm[None, :], other=0.0)  # [H, C] = fc2ᵀ
        b2 = tl.load(B2 + cc, mask=cm, other=0.0).to(tl.float32)
        o = _dot(h, w2t, IEEE) + b2[None, :]
        g = tl.load(GATE + rows[:, None] * g_stride + cc[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * C + cc[None, :], (x + g * o).to(OUT.dtype.element_ty), mask=m)


def pit_mlp(x, norm_weight, shift, scale, gate, fc1_w, fc1_b, fc2_w, fc2_b, eps: float = 1e-6) -> torch.Tensor:
    """x [..., C] pixel tokens; shift/scale/gate shaped like x (strided chunks are fine); fc1 [H, C], fc2 [C, H]."""
    C, H = x.shape[-1], fc1_w.shape[0]
    if fc1_w.shape != (H, C) or fc2_w.shape != (C, H):
        raise ValueError(f"pit_mlp: fc1 {tuple(fc1_w.shape)} / fc2 {tuple(fc2_w.shape)} do not fit pixel_dim {C}")
    if C > 128 or H > 512:
        raise ValueError(f"pit_mlp: pixel_dim {C} / hidden {H} exceed the kernel's block limits (128 / 512)")
    xr, xs = rows_of(x)
    sh, shs, _ = mod_rows(shift, x)
    sc, scs, _ = mod_rows(scale, x)
    g, gs, _ = mod_rows(gate, x)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n = x.numel() // C
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]),)  # noqa: E731
    _pit_mlp_kernel[grid](
        xr, norm_weight, sh, sc, g, fc1_w.contiguous(), fc1_b, fc2_w.contiguous(), fc2_b, out, n, C, H,
        xs, shs, scs, gs, eps, BLOCK_C=max(16, triton.next_power_of_2(C)), BLOCK_H=max(16, triton.next_power_of_2(H)),
        IEEE=x.dtype == torch.float32 or INTERPRET,  # the CPU interpreter's bf16 dot is not faithful
    )  # fmt: skip
    return out


def tune_key(x, norm_weight, shift, scale, gate, fc1_w, *rest, **kw) -> tuple:
    C, H = x.shape[-1], fc1_w.shape[0]
    tensors = (x, norm_weight, shift, scale, gate, fc1_w, rest[0], rest[1], rest[2], x)
    return ("pit_mlp", C, H, *(str(t.dtype) for t in tensors))


def _cases(cfg, H, W, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    p, d = cfg.patch_size, cfg.pixel_hidden_size
    L, P2 = (H // p) * (W // p), p * p
    x, w, (s2, c2, g2) = rnd(L, P2, d), rnd(d), rnd(L, P2, 6 * d).chunk(6, -1)[3:]
    fc1w, fc1b, fc2w, fc2b = rnd(4 * d, d), rnd(4 * d), rnd(d, 4 * d), rnd(d)
    return [("pit_mlp sub-block", lambda: pit_mlp(x, w, s2, c2, g2, fc1w, fc1b, fc2w, fc2b),
             lambda: reference(x, w, s2, c2, g2, fc1w, fc1b, fc2w, fc2b))]  # fmt: skip


def _aot_cases(p2):
    yield {"BLOCK_C": 16, "BLOCK_H": 64, "IEEE": False}, 16 + 64


OP = Op("pit_mlp", reference={"pit_mlp": reference}, fused={"pit_mlp": pit_mlp}, key={"pit_mlp": tune_key},
        kernel="_pit_mlp_kernel", candidates=CANDIDATES, aot_cases=_aot_cases, cases=_cases)  # fmt: skip
