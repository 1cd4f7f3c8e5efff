"""Gated residual add: x + gate · y, gate per token ([B, 1, D]) or per pixel (shaped like x, strided).

Order: torch reference, kernel, host wrapper, the `Op` record.
"""

from __future__ import annotations

import torch

from pipeline.kernels._common import HAVE_TRITON, Op, check_last_dim, configs, mod_rows, prune, row_bucket, rows_of


def reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + gate * y


CANDIDATES = ([1, 4, 16, 64, 256], [1, 4, 8])  # (rows per program, warps): pruned per row width by _common.prune

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.autotune(configs=configs(*CANDIDATES), key=["D", "row_bucket"],
                     prune_configs_by=prune(lambda a: a["BLOCK_D"]))  # fmt: skip
    @triton.jit
    def _gated_residual_kernel(
        X, G, Y, OUT, n_rows, D, x_stride, g_stride, y_stride, group, row_bucket, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):  # fmt: skip
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
    _gated_residual_kernel[grid](xr, g, yr, out, n_rows, D, xs, gs, ys, group, row_bucket(n_rows),
                                 BLOCK_D=triton.next_power_of_2(D))  # fmt: skip
    return out


def tune_key(x, gate, y) -> tuple:
    D = x.shape[-1]
    return ("gated_residual", D, row_bucket(x.numel() // D), *(str(t.dtype) for t in (x, gate, y, x)))


def _cases(cfg, H, W, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    p, D, d = cfg.patch_size, cfg.hidden_size, cfg.pixel_hidden_size
    L, P2 = (H // p) * (W // p), p * p
    x_tok, g_t, y_tok = rnd(1, L, D), rnd(1, 1, 6 * D).chunk(6, -1)[2], rnd(1, L, D)
    x_pix, g1, y_pix = rnd(L, P2, d), rnd(L, P2, 6 * d).chunk(6, -1)[2], rnd(L, P2, d)
    return [
        ("gated_residual per-token", lambda: gated_residual(x_tok, g_t, y_tok), lambda: reference(x_tok, g_t, y_tok)),
        ("gated_residual per-pixel", lambda: gated_residual(x_pix, g1, y_pix), lambda: reference(x_pix, g1, y_pix)),
    ]


def _aot_cases(p2):
    for d in (1536, 128, 16):
        yield {"BLOCK_D": p2(d)}, p2(d)


OP = Op("gated_residual", reference={"gated_residual": reference}, fused={"gated_residual": gated_residual},
        key={"gated_residual": tune_key}, kernel="_gated_residual_kernel", candidates=CANDIDATES,
        aot_cases=_aot_cases, cases=_cases)  # fmt: skip
