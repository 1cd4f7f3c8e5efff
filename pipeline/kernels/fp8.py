"""FP8 matmuls for the network's linear layers, applied to a built network without touching model code.

`quantize_fp8(net)` swaps each eligible `nn.Linear` for an `Fp8Linear`: weights quantised once per output channel,
activations per token at every call, both to e4m3 (max 448) with float32 scales, multiplied by `torch._scaled_mm`
with row-wise scales (fp8 tensor cores on sm_89+; the same call runs on the CPU, so the numerics are checked here).
cuBLASLt takes only a row-major first operand and a column-major second: activations are quantised into a row-major
copy whatever their layout, weights are stored row-major [out, in] and passed transposed.
Layers that stay in the network's dtype (`KEEP`, by module name): the adaLN modulation projections, the caption
embedder and the LQ projection — a small share of the FLOPs, and keeping them measured +0.7 to +3.4 dB on the
bundled model's sample images (`tests/bench_fp8.py`) — and the layers whose weights the network or a fused op reads
directly (the final layer, the timestep embedder, the PiT MLP of `Ops.pit_mlp`). Layers whose sides are not
multiples of 16 (what `_scaled_mm` needs) stay too. What runs in FP8: the attention projections (qkv, out) and the
MLPs of the patch blocks, and the pixel blocks' compress/expand and attention projections.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# module-name parts of the layers kept in the network's dtype (see the module docstring)
KEEP = ("adaLN", "mod", "t_embedder", "y_embedder", "lq_proj", "final_layer", "mlp.fc1", "mlp.fc2")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K] row-major, float32 scale [M, 1]) with x ≈ q · scale, one scale per row.

    The result is row-major whatever x's layout: element-wise ops keep their input's strides, and a column-major x
    (the patch embedding's input is a transposed view) would give `_scaled_mm` a first operand cuBLASLt refuses."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.contiguous(), scale.contiguous()


class Fp8Linear(nn.Module):
    """y = x Wᵀ + b with W per output channel and x per token in e4m3; output in x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_rows(linear.weight.detach())
        self.register_buffer("qweight", q)  # [out, in] row-major: qweight.t() is the column-major second operand
        self.register_buffer("w_scale", s.t().contiguous())  # -> [1, out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, self.in_features))  # -> [tokens, in]
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) or x.device.type == "cpu" else torch.bfloat16
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.w_scale, out_dtype=out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def eligible(name: str, module: nn.Module, keep=None) -> bool:
    if not isinstance(module, nn.Linear) or any(k in name for k in (KEEP if keep is None else keep)):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_fp8(net: nn.Module, keep=None) -> list[str]:
    """Swap every eligible linear layer of net for an Fp8Linear, in place; returns the names swapped."""
    swapped = []
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if eligible(full, child, keep):
                setattr(module, child_name, Fp8Linear(child))
                swapped.append(full)
    return swapped
