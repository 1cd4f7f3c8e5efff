"""RMSNorm, and RMSNorm + AdaLN modulate: norm(x)·w·(1 + scale) + shift, per token or per pixel, in one pass.

Eager PyTorch reads x twice and writes three temporaries; the kernel reads x, w, shift, scale once and writes the
result once. Rows are processed in blocks of BLOCK_R so that the PiT case (rows of 16) fills the GPU as well as the
patch case (rows of 1536). Order: torch reference, kernel, host wrapper, the `Op` record.
"""

from __future__ import annotations

import torch

from pipeline.kernels._common import HAVE_TRITON, Op, check_last_dim, configs, mod_rows, prune, row_bucket, rows_of


# ------------------------------------------------------------------------------------------------ reference
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as the official checkpoints expect."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def norm_modulate(x, weight, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    """AdaLN: RMSNorm(x)·w·(1 + scale) + shift."""
    return rms_norm(x, weight, eps) * (1 + scale) + shift


# ------------------------------------------------------------------------------------------------ kernel
CANDIDATES = ([1, 4, 16, 64, 256], [1, 4, 8])  # (rows per program, warps): pruned per row width by _common.prune

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.autotune(configs=configs(*CANDIDATES), key=["D", "HAS_MOD", "row_bucket"],
                     prune_configs_by=prune(lambda a: a["BLOCK_D"]))  # fmt: skip
    @triton.jit
    def _rms_norm_modulate_kernel(
        X, W, SHIFT, SCALE, OUT, n_rows, D, x_stride, shift_stride, scale_stride, group, eps, row_bucket,
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


# ------------------------------------------------------------------------------------------------ host wrapper
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
        xr, weight, sh, sc, out, n_rows, D, x_stride, sh_stride, sc_stride, group, eps, row_bucket(n_rows),
        HAS_MOD=has_mod, BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
    return out


def _fused_norm(x, weight, eps=1e-6):
    return rms_norm_modulate(x, weight, eps=eps)


def _fused_norm_modulate(x, weight, shift, scale, eps=1e-6):
    return rms_norm_modulate(x, weight, shift, scale, eps)


def tune_key(x, weight, shift=None, scale=None, eps=1e-6) -> tuple:
    """The autotune key of a launch on x: (row width, modulated, row bucket, dtypes of the tensors passed)."""
    D = x.shape[-1]
    mod = shift is not None
    dts = (x, weight, shift, scale, x) if mod else (x, weight, x, x, x)  # X, W, SHIFT, SCALE, OUT
    return ("rms_norm_modulate", D, mod, row_bucket(x.numel() // D), *(str(t.dtype) for t in dts))


def _norm_key(x, weight, eps=1e-6) -> tuple:
    return tune_key(x, weight)


def _cases(cfg, H, W, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    p, D, d = cfg.patch_size, cfg.hidden_size, cfg.pixel_hidden_size
    L, P2 = (H // p) * (W // p), p * p
    x_tok, mod_tok, w_tok = rnd(1, L, D), rnd(1, 1, 6 * D), rnd(D)
    sh_t, sc_t = mod_tok.chunk(6, -1)[:2]
    x_pix, mod_pix, w_pix = rnd(L, P2, d), rnd(L, P2, 6 * d), rnd(d)
    s1, c1 = mod_pix.chunk(6, -1)[:2]
    return [
        ("norm_modulate per-token", lambda: rms_norm_modulate(x_tok, w_tok, sh_t, sc_t),
         lambda: norm_modulate(x_tok, w_tok, sh_t, sc_t)),
        ("norm_modulate per-pixel", lambda: rms_norm_modulate(x_pix, w_pix, s1, c1),
         lambda: norm_modulate(x_pix, w_pix, s1, c1)),
    ]  # fmt: skip


def _aot_cases(p2):
    for d in (1536, 128, 16):  # patch tokens (flux-2k), patch tokens (small), pixel rows
        yield {"HAS_MOD": True, "BLOCK_D": p2(d)}, p2(d)


OP = Op(
    "rms_norm_modulate",
    reference={"rms_norm": rms_norm, "norm_modulate": norm_modulate},
    fused={"rms_norm": _fused_norm, "norm_modulate": _fused_norm_modulate},
    key={"rms_norm": _norm_key, "norm_modulate": tune_key},
    kernel="_rms_norm_modulate_kernel",
    candidates=CANDIDATES,
    aot_cases=_aot_cases,
    cases=_cases,
)
