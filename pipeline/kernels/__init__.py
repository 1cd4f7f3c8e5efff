"""The seam between the PiD network and its memory-bound element-wise chains.

The network calls these through an `Ops` object handed to its constructor, so a fused backend
(Triton on CUDA) can replace the torch reference without touching model code. Today only the
reference exists; `get_ops("triton")` says so.
"""

from __future__ import annotations

from pipeline.kernels.reference import TorchOps

Ops = TorchOps


def get_ops(backend: str = "auto") -> TorchOps:
    if backend in ("auto", "torch"):
        return TorchOps()
    if backend == "triton":
        raise ValueError("the Triton kernels are not built yet; use backend='torch' or 'auto'")
    raise ValueError(f"unknown kernel backend {backend!r}: expected 'auto', 'torch' or 'triton'")


__all__ = ["Ops", "TorchOps", "get_ops"]
