"""Patchify/unpatchify by reshapes (issue 12, finding 6): exactly F.unfold / F.fold, and torch.compile agrees with
eager on the CPU (its Inductor lowering of F.fold miscompiled with more than one thread)."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.network import patchify, unpatchify

from conftest import random_net, tiny_config


@pytest.mark.parametrize("shape,p", [((2, 3, 16, 24), 8), ((1, 6, 8, 8), 4), ((3, 1, 6, 9), 3)])
def test_patchify_and_unpatchify_equal_unfold_and_fold(shape, p):
    x = torch.randn(shape)
    B, C, H, W = shape
    assert torch.equal(patchify(x, p), F.unfold(x, kernel_size=p, stride=p).transpose(1, 2))
    L = (H // p) * (W // p)
    px = torch.randn(B, L, p * p, C)
    ref = F.fold(px.permute(0, 3, 2, 1).reshape(B, -1, L), (H, W), kernel_size=p, stride=p)
    assert torch.equal(unpatchify(px, H // p, W // p, p), ref)
    assert torch.equal(unpatchify(patchify(x, p).view(B, L, C, p * p).transpose(2, 3), H // p, W // p, p), x)


@pytest.mark.slow
def test_compiled_network_matches_eager_on_the_cpu():
    torch.manual_seed(0)
    cfg = tiny_config()
    net = random_net(cfg)
    x, t = torch.randn(2, 3, 32, 32), torch.full((2,), 500.0)
    y, lq = torch.randn(2, 4, 8), torch.randn(2, 4, 4, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            feats = net.encode_lq((32, 32), latent=lq)
            eager = net(x, t, y, feats, torch.zeros(2))
            compiled = torch.compile(net)(x, t, y, feats, torch.zeros(2))
    finally:
        torch.set_num_threads(threads)
    err = (compiled - eager).abs().max().item()
    print(f"compile vs eager on the CPU: max abs {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("shape,p", [((2, 3, 128, 96), 16), ((1, 6, 32, 40), 8)])
def test_patch_embedding_sees_the_official_layout(shape, p):
    """The reshape patchify hands the embedding's matmul the very strides of the official `F.unfold(...)
    .transpose(1, 2)`, so the embedding is bit-identical to the official expression — both computed here, on the
    same machine (a contiguous [B, L, C·p²] copy takes another GEMM path and moves the result by ~5e-6)."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    official = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
    ours = patchify(x, p)
    assert ours.stride() == official.stride() and ours.shape == official.shape
    embed = torch.nn.Linear(shape[1] * p * p, 64)
    with torch.inference_mode():
        assert torch.equal(embed(ours), embed(official))
