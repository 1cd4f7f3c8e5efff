"""The model API refuses bad input with messages that name the offending values; v1.5 mechanics work."""

import dataclasses

import pytest
import torch

from pipeline.model.network import PidNet

from conftest import random_net, tiny_config


def _inputs(cfg, B=1, hw=(32, 48)):
    f = cfg.latent_factor
    x = torch.randn(B, 3, *hw)
    lat = torch.randn(B, cfg.lq_latent_channels, hw[0] // f, hw[1] // f)
    y = torch.randn(B, cfg.txt_max_length, cfg.txt_embed_dim)
    return x, lat, y


def test_forward_shape_and_determinism():
    cfg = tiny_config()
    net = random_net(cfg)
    x, lat, y = _inputs(cfg, B=2)
    lq = net.encode_lq((32, 48), latent=lat)
    a = net(x, torch.tensor([500.0, 900.0]), y, lq, torch.tensor([0.0, 0.3]))
    b = net(x, torch.tensor([500.0, 900.0]), y, lq, torch.tensor([0.0, 0.3]))
    assert a.shape == x.shape and torch.equal(a, b)


def test_wrong_latent_channels_names_the_preset_channels():
    cfg = tiny_config()
    net = random_net(cfg)
    with pytest.raises(ValueError, match=r"latent must be \[B, 4, h, w\].*got \(1, 16, 4, 6\)"):
        net.encode_lq((32, 48), latent=torch.zeros(1, 16, 4, 6))


def test_sizes_not_multiple_of_patch_are_refused():
    cfg = tiny_config()
    net = random_net(cfg)
    with pytest.raises(ValueError, match="30x48 must be positive multiples of the patch size 8"):
        net.encode_lq((30, 48), latent=torch.zeros(1, 4, 4, 6))
    x, lat, y = _inputs(cfg)
    lq = net.encode_lq((32, 48), latent=lat)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        net(torch.zeros(1, 3, 33, 48), torch.zeros(1), y, lq)


def test_a_latent_off_the_output_grid_is_aligned_not_refused():
    """Issue 13 (2): as the official LQ projection, a latent whose grid does not match the output is resized to the
    patch grid (bilinear, align_corners=False, when a latent pixel is one patch, as in this config)."""
    import torch.nn.functional as F

    cfg = tiny_config()
    net = random_net(cfg)
    lat = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = net.encode_lq((32, 48), latent=lat)
        want = net.encode_lq((32, 48), latent=F.interpolate(lat, size=(4, 6), mode="bilinear", align_corners=False))
    assert all(torch.equal(a, b) for a, b in zip(got.heads, want.heads))


def test_nan_latent_and_missing_lq_are_refused():
    cfg = tiny_config()
    net = random_net(cfg)
    lat = torch.zeros(1, 4, 4, 6)
    lat[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net.encode_lq((32, 48), latent=lat)
    x, _, y = _inputs(cfg)
    with pytest.raises(ValueError, match="needs LQ features"):
        net(x, torch.zeros(1), y)
    with pytest.raises(ValueError, match=r"caption embedding must be \[B, L, 8\]"):
        net(x, torch.zeros(1), torch.zeros(1, 4, 5), net.encode_lq((32, 48), latent=torch.zeros(1, 4, 4, 6)))


def test_v15_mechanics_change_the_output():
    """Per-token gate, PiT LQ injection, unpatchified latents and replicate padding all take part."""
    cfg = tiny_config(
        lq_gate_type="sigma_aware_per_token", pit_lq_inject=True, lq_aux_rgb_head=True, rope_mode="ntk_aware",
        rope_ref_h=64, rope_ref_w=64, lq_conv_padding_mode="replicate", lq_latent_channels=16,
        lq_latent_unpatchify_factor=2, latent_spatial_down_factor=8,
    )  # fmt: skip
    net = random_net(cfg)
    x, lat, y = _inputs(cfg)
    assert lat.shape[1:] == (16, 2, 3)
    lq = net.encode_lq((32, 48), latent=lat)
    assert lq.pit is not None and lq.pit.shape == (1, 24, 32)
    t = torch.tensor([700.0])
    out = net(x, t, y, lq, torch.tensor([0.1]))
    no_pit = dataclasses.replace(lq, pit=None)
    assert not torch.allclose(out, net(x, t, y, no_pit, torch.tensor([0.1])))
    # sigma matters through the gates
    assert not torch.allclose(out, net(x, t, y, lq, torch.tensor([0.9])))


def test_rope_modes_differ_only_off_reference_grid():
    from pipeline.model.math import rope_2d

    a = rope_2d(16, 4, 6)
    b = rope_2d(16, 4, 6, ntk_ref=(4, 6))
    c = rope_2d(16, 8, 6, ntk_ref=(4, 6))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert not torch.allclose(rope_2d(16, 8, 6)[0], c[0])


def test_bf16_forward_runs_and_is_close_to_fp32():
    cfg = tiny_config()
    net = random_net(cfg)
    x, lat, y = _inputs(cfg)
    t, s = torch.tensor([400.0]), torch.tensor([0.0])
    ref = net(x, t, y, net.encode_lq((32, 48), latent=lat), s)
    net16 = PidNet(cfg, dtype=torch.bfloat16)
    net16.load_state_dict({k: v.bfloat16() for k, v in net.state_dict().items()})
    out = net16(x.bfloat16(), t, y.bfloat16(), net16.encode_lq((32, 48), latent=lat.bfloat16()), s)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.1
