"""The full network with the Triton backend (CPU interpreter) gives the reference backend's output."""

import torch

from pipeline.kernels import get_ops
from pipeline.model.network import PidNet

from conftest import random_net, tiny_config


def test_network_kernels_on_vs_off():
    cfg = tiny_config(pixel_hidden_size=16, pit_lq_inject=True, lq_gate_type="sigma_aware_per_token")
    ref = random_net(cfg)
    fused = PidNet(cfg, ops=get_ops("triton"))
    fused.load_state_dict(ref.state_dict())
    assert fused.ops.name == "triton" and ref.ops.name == "torch"
    torch.manual_seed(3)
    x, y = torch.randn(1, 3, 32, 48), torch.randn(1, 4, 8)
    lat = torch.randn(1, 4, 4, 6)
    t, s = torch.tensor([700.0]), torch.tensor([0.2])
    with torch.inference_mode():
        a = ref(x, t, y, ref.encode_lq((32, 48), latent=lat), s)
        b = fused(x, t, y, fused.encode_lq((32, 48), latent=lat), s)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_auto_backend_is_torch_on_cpu_and_force_switch():
    assert get_ops("auto", device="cpu").name == "torch"
    assert get_ops("triton").name == "triton"
    assert get_ops("torch").name == "torch"
