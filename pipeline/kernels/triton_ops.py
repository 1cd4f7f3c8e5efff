"""Triton backend of the `Ops` interface: the fused kernels where they apply, the reference elsewhere."""

from __future__ import annotations

from pipeline.kernels import reference
from pipeline.kernels.gated_residual import gated_residual
from pipeline.kernels.pit_mlp import pit_mlp
from pipeline.kernels.qk_norm_rope import qk_norm_rope
from pipeline.kernels.rms_norm_modulate import rms_norm_modulate
from pipeline.kernels.tile_blend import tile_blend


def _norm(x, weight, eps=1e-6):
    return rms_norm_modulate(x, weight, eps=eps)


def _norm_modulate(x, weight, shift, scale, eps=1e-6):
    return rms_norm_modulate(x, weight, shift, scale, eps)


def _qk(q, k, q_weight, k_weight, rope, eps=1e-6):
    if rope is None:
        return rms_norm_modulate(q, q_weight, eps=eps), rms_norm_modulate(k, k_weight, eps=eps)
    return qk_norm_rope(q, k, q_weight, k_weight, rope, eps)


class TritonOps(reference.TorchOps):
    name = "triton"
    rms_norm = staticmethod(_norm)
    norm_modulate = staticmethod(_norm_modulate)
    gated_residual = staticmethod(gated_residual)
    qk_norm_rope = staticmethod(_qk)
    pit_mlp = staticmethod(pit_mlp)
    tile_blend = staticmethod(tile_blend)
