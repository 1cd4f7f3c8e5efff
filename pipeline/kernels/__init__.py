"""The seam between the PiD network and its memory-bound element-wise chains.

The network calls these through an `Ops` object handed to its constructor, so the fused Triton
backend replaces the torch reference without touching model code. `get_ops("auto")` picks Triton
on CUDA when it is importable and the reference otherwise; `PIDRAY_KERNELS=torch|triton` forces one.
Each kernel lives in `pipeline/kernels/<op>.py` with its host wrapper; `reference.py` holds the
torch versions; `tests/kernels/test_<op>.py` compares them (on the CPU with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

from pipeline.kernels.reference import TorchOps

Ops = TorchOps
BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_ops(backend: str | None = None, device=None):
    """The kernel backend: 'torch' (reference), 'triton', or 'auto' (Triton on CUDA, else torch)."""
    backend = backend or os.environ.get("PIDRAY_KERNELS", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: expected one of {BACKENDS}")
    if backend == "torch":
        return TorchOps()
    if backend == "auto":
        import torch

        on_cuda = device is not None and torch.device(device).type == "cuda"
        if not (on_cuda and triton_available()):
            return TorchOps()
    if not triton_available():
        raise ValueError("kernel backend 'triton' requested but triton is not installed")
    from pipeline.kernels.triton_ops import TritonOps

    return TritonOps()


__all__ = ["Ops", "TorchOps", "get_ops", "triton_available"]
