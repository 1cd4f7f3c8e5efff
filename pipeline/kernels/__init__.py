"""The seam between the PiD network and its memory-bound element-wise chains.

The network calls these through an `Ops` object handed to its constructor, so the fused Triton backend replaces
the torch reference without touching model code. `get_ops("auto")` picks Triton on CUDA when it is importable and
the reference otherwise; `PIDRAY_KERNELS=torch|triton` forces one.

One op per file, `pipeline/kernels/<op>.py`: its torch reference, its Triton kernel and host wrapper, and an `Op`
record; `OPS` below is the one list that the backends, the AOT compile check (`aot.py`), the doctor and the tests
iterate. A new kernel: its file, one line here, and `tests/kernels/test_<op>.py` comparing it with its reference.
"""

from __future__ import annotations

import os

from pipeline.kernels import gated_residual, pit_mlp, qk_norm_rope, rms_norm_modulate, tile_blend
from pipeline.kernels._common import HAVE_TRITON, Op

OPS: tuple[Op, ...] = (rms_norm_modulate.OP, gated_residual.OP, qk_norm_rope.OP, pit_mlp.OP, tile_blend.OP)
BACKENDS = ("auto", "torch", "triton")


def _backend(name: str, table: str) -> type:
    methods = {m: staticmethod(f) for op in OPS for m, f in op.reference.items()}
    if table == "fused":
        methods.update({m: staticmethod(f) for op in OPS for m, f in op.fused.items()})
    return type(f"{name.title()}Ops", (), {"name": name, **methods, "__doc__": f"The {name} backend of `Ops`."})


TorchOps = _backend("torch", "reference")  # every method is the reference its fused twin is tested against
TritonOps = _backend("triton", "fused")  # the fused kernels (launched only where triton is installed)
Ops = TorchOps


def triton_available() -> bool:
    return HAVE_TRITON


def tune_keys(name: str, *args, **kwargs) -> tuple | None:
    """The autotune key a fused launch of Ops method `name` would use for these arguments (None: not autotuned)."""
    for op in OPS:
        if name in op.key:
            return op.key[name](*args, **kwargs)
    return None


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
    return TritonOps()


__all__ = ["OPS", "Ops", "TorchOps", "TritonOps", "get_ops", "triton_available", "tune_keys"]
