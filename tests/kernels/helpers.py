"""Comparison helper for kernel tests: reports the first mismatching index, not just 'not close'."""

import torch

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}  # (atol, rtol)


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    got, ref = got.float(), ref.float()
    scale = ref.abs().max().clamp_min(1.0)
    bad = (got - ref).abs() > atol * scale + rtol * ref.abs()
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: got {got[idx].item():.6g}, "
            f"expected {ref[idx].item():.6g}; max abs err {(got - ref).abs().max().item():.3g}"
        )
