"""FP8 operand layout: cuBLASLt's `_scaled_mm` takes only a row-major first operand and a column-major second.

A full-depth flux-2k forward with `--precision fp8` is traced on the meta device (whose `_scaled_mm` makes the same
layout check as CUDA) at the shapes the doctor and the diffuse stage use, and the strides of every call recorded.
"""

import pytest
import torch

from pipeline.kernels.fp8 import Fp8Linear, quantize_fp8, quantize_rows


def _trace(size: int, batch: int, monkeypatch) -> list[dict]:
    from pipeline.kernels import TorchOps
    from pipeline.model.network import LQFeatures, PidNet
    from pipeline.model.presets import get_preset

    calls = []
    real = torch._scaled_mm

    def record(a, b, *args, **kw):
        calls.append({"a": (tuple(a.shape), a.stride()), "b": (tuple(b.shape), b.stride()), "a_dtype": a.dtype})
        return real(a, b, *args, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", record)
    cfg = get_preset("flux-2k").config
    with torch.device("meta"), torch.inference_mode():
        net = PidNet(cfg, ops=TorchOps(), dtype=torch.bfloat16).eval().requires_grad_(False)
        assert len(quantize_fp8(net)) > 100
        f = cfg.latent_factor
        x = torch.zeros(batch, 3, size, size, dtype=torch.bfloat16)
        lat = torch.zeros(batch, cfg.lq_latent_channels, size // f, size // f, dtype=torch.bfloat16)
        y = torch.zeros(batch, cfg.txt_max_length, cfg.txt_embed_dim, dtype=torch.bfloat16)
        t, s = torch.zeros(batch), torch.zeros(batch)
        lq = LQFeatures(*net.lq_proj(lat, None, *net.grid(size, size)), None)  # encode_lq reads values: not on meta
        out = net(x, t, y, lq, s)
    assert out.shape == (batch, 3, size, size)
    return calls


@pytest.mark.parametrize("size,batch", [(2048, 1), (2048, 4), (3840, 1)])
def test_every_scaled_mm_of_a_full_depth_forward_gets_cublaslt_layouts(size, batch, monkeypatch):
    calls = _trace(size, batch, monkeypatch)
    assert len(calls) >= 140, len(calls)  # every FP8 layer of the 1.36B network, the patch embedding included
    for c in calls:
        (m, k), a_stride = c["a"]
        (k2, n), b_stride = c["b"]
        assert k == k2
        assert a_stride == (k, 1), c  # row-major first operand
        assert b_stride == (1, k), c  # column-major second operand
    first = calls[0]["a"][0]
    p = 16
    assert first == (batch * (size // p) ** 2, 3 * p * p)  # the patch embedding (a transposed view before the fix)


def test_quantize_rows_returns_row_major_for_a_column_major_input():
    x = torch.randn(48, 32).t()  # [32, 48], strides (1, 32)
    q, s = quantize_rows(x)
    assert q.is_contiguous() and s.shape == (32, 1)
    torch.testing.assert_close(q.float() * s, x, atol=0.1, rtol=0.07)
    lin = torch.nn.Linear(48, 16)
    f = Fp8Linear(lin)
    assert f(x).shape == (32, 16) and f.qweight.t().stride() == (1, 48)
