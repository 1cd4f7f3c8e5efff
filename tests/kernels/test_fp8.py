"""FP8 linear layers (`--precision fp8`): the exact quantise → matmul numerics, which layers are swapped, and the
network's output staying close."""

import torch
from torch import nn

from pipeline.kernels.fp8 import E4M3, KEEP, Fp8Linear, quantize_fp8, quantize_rows

from conftest import random_net, tiny_config


def test_fp8_linear_is_rowwise_e4m3_numerics():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64) * torch.logspace(-2, 2, 64)  # per-channel magnitudes over four decades
    f = Fp8Linear(lin)
    assert f.qweight.dtype == E4M3 and f.w_scale.shape == (1, 48)
    xq, xs = quantize_rows(x.reshape(-1, 64))
    emulated = (xq.float() * xs) @ (f.qweight.float() * f.w_scale.t()).t() + lin.bias
    got = f(x)
    assert got.shape == (2, 5, 48)
    torch.testing.assert_close(got.reshape(-1, 48), emulated, atol=1e-5, rtol=1e-5)
    exact = lin(x)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.1, rel  # quantised (not a copy of fp32), within e4m3's reach


def test_quantize_swaps_only_eligible_layers_and_the_network_stays_close():
    cfg = tiny_config(hidden_size=64, pixel_attn_hidden_size=32)
    ref = random_net(cfg).requires_grad_(False)
    net = random_net(cfg).requires_grad_(False)
    swapped = quantize_fp8(net)
    assert swapped and not any(k in n for n in swapped for k in KEEP)
    assert all(isinstance(net.get_submodule(n), Fp8Linear) for n in swapped)
    assert isinstance(net.final_layer.linear, nn.Linear)  # read directly by the network: kept
    torch.manual_seed(3)
    x, y = torch.randn(1, 3, 32, 48), torch.randn(1, 4, 8)
    lat, t, s = torch.randn(1, 4, 4, 6), torch.tensor([700.0]), torch.tensor([0.2])
    with torch.inference_mode():
        a = ref(x, t, y, ref.encode_lq((32, 48), latent=lat), s)
        b = net(x, t, y, net.encode_lq((32, 48), latent=lat), s)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.1, rel
