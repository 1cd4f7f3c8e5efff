"""The second version of the bundled model: its conv head, the shifted-grid ensemble, the seam loss, old files."""

import dataclasses

import pytest
import torch

from pipeline.model.network import PidNet, check_shift
from pipeline.model.presets import get_preset
from pipeline.quality import grid_ratio

from conftest import tiny_config


def rgb_config(**kw):
    base = dict(lq_in_channels=3, lq_latent_channels=0, sr_scale=4, prediction_type="x0", input_concat_lq=True,
                residual_lq=True, txt_max_length=1)  # fmt: skip
    base.update(kw)
    return tiny_config(**base)


def _outputs(net, lq, shift=4):
    out_hw = (lq.shape[-2] * 4, lq.shape[-1] * 4)
    x = torch.randn(1, 3, *out_hw, generator=torch.Generator().manual_seed(1))
    t, y, s = torch.full((1,), 1000.0), torch.zeros(1, 1, 8), torch.zeros(1)
    with torch.no_grad():
        f = net.encode_lq(out_hw, image=lq)
        plain = net(x, t, y, f, s)
        both = net.forward_shift_ensemble(x, t, y, f, net.encode_lq_shifted(out_hw, lq, shift), s, shift)
    return plain[0].clamp(-1, 1), both[0].clamp(-1, 1)


class Blocky(PidNet):
    """The network plus a ±0.05 checkerboard of its own 8-pixel patches: a patch grid as strong as we like, tied
    to the grid the network itself works on (what the shifted pass moves)."""

    def forward(self, x, *a, **kw):
        out = super().forward(x, *a, **kw)
        gh, gw = x.shape[-2] // 8, x.shape[-1] // 8
        board = (torch.arange(gh)[:, None] + torch.arange(gw)[None]) % 2 * 0.1 - 0.05
        return out + torch.kron(board, torch.ones(8, 8))


def test_shift_ensemble_is_aligned_and_averages_the_patch_grid_away():
    """At its training init the network is bicubic exactly: the ensemble must give the very same picture (the
    shifted pass is cropped back to the right pixels) but at the tile's 4-pixel rim. A network with a patch grid:
    averaged with the half-patch-shifted pass, every seam's jump halves (two grids of half the jump, each line in
    the middle of the other's patches), and the period-8 grid ratio falls accordingly."""
    from jobs.train_small import init_weights

    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    net = PidNet(rgb_config(out_conv=8)).eval()
    init_weights(net)
    bicubic, both = _outputs(net, lq)
    assert torch.allclose(bicubic[:, 4:-4, 4:-4], both[:, 4:-4, 4:-4], atol=1e-5)
    blocky = Blocky(net.cfg).eval()
    blocky.load_state_dict(net.state_dict())
    plain, both = _outputs(blocky, lq)

    def biggest_jump(out):
        d = (out - bicubic)[:, 8:-8, 8:-8]
        return max(d.diff(dim=-1).abs().max().item(), d.diff(dim=-2).abs().max().item())

    g_plain, g_both = grid_ratio(plain, lq[0], 8), grid_ratio(both, lq[0], 8)
    print(f"grid ratio plain {g_plain:.3f}, ensemble {g_both:.3f}; jumps {biggest_jump(plain)} {biggest_jump(both)}")
    assert abs(biggest_jump(plain) - 0.1) < 1e-3 and abs(biggest_jump(both) - 0.05) < 1e-3
    assert g_plain > 10 and g_both < g_plain / 3


def test_shift_ensemble_refuses_what_it_cannot_shift():
    net = PidNet(rgb_config())
    for bad in (0, 8, 2, 3):  # no shift, a whole patch (same grid), not whole LQ pixels
        with pytest.raises(ValueError, match="shift"):
            check_shift(net.cfg, bad)
    check_shift(net.cfg, 4)
    with pytest.raises(ValueError, match="RGB-conditioned"):
        check_shift(tiny_config(), 4)  # a VAE-latent model: no LQ pixel to shift by


def test_conv_head_sees_across_patch_lines_and_starts_silent():
    """The conv head's output at a pixel depends on the next patch's features (the per-patch layers' does not);
    the trainer's init leaves it at zero, so a network with it starts where one without it does."""
    from jobs.train_small import init_weights

    torch.manual_seed(0)
    net = PidNet(rgb_config(out_conv=8)).eval()
    h = torch.zeros(1, 4, 16, 16, requires_grad=True)
    net.out_conv(h)[0, :, 3, 7].sum().backward()  # pixel (3, 7): the last column of the first patch
    assert h.grad[0, :, :, 8].abs().sum() > 0  # column 8 is the next patch
    init_weights(net)
    lq = torch.rand(1, 3, 8, 8) * 2 - 1
    f = net.encode_lq((32, 32), image=lq)
    with torch.no_grad():
        feat_only = net(torch.randn(1, 3, 32, 32), torch.full((1,), 1000.0), torch.zeros(1, 1, 8), f, torch.zeros(1))
    assert torch.allclose(feat_only, f.upsampled, atol=1e-6)  # zero head, zero final layer: bicubic exactly


def test_seam_loss_weighs_only_patch_lines():
    from jobs.train_small import seam_loss

    on, off = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    on[..., :, 8:] = 1  # a step across the patch line between columns 7 and 8
    off[..., :, 5:] = 1  # the same step inside a patch
    assert seam_loss(on, torch.zeros_like(on), 8) > 0.4
    assert seam_loss(off, torch.zeros_like(off), 8) == 0
    assert seam_loss(on, on.clone(), 8) == 0


def test_previous_bundled_model_still_loads_through_the_normal_path():
    """Our own files carry their config: the first version (no conv head, 2 LQ blocks) loads under `small`."""
    from jobs.eval_small import PREVIOUS, shipped_settings
    from pipeline.runtime import ModelOptions, load_net

    if not PREVIOUS.is_file():
        pytest.skip("the previous model file is not in this checkout")
    _, old = load_net(ModelOptions(weights=str(PREVIOUS), device="cpu", dtype="fp32"), get_preset("small"))
    _, new = load_net(ModelOptions(device="cpu", dtype="fp32"), get_preset("small"))
    assert old.out_conv is None and old.cfg.lq_num_res_blocks == 2
    assert new.cfg != old.cfg and new.out_conv is not None
    assert shipped_settings(str(PREVIOUS)) == (4, False) and shipped_settings(None) == (1, None)


def test_ensemble_setting_per_preset_and_refused_where_it_cannot_work():
    from pipeline.errors import BadParameter
    from pipeline.model.presets import get_preset
    from pipeline.model.sampling import ensemble_shift
    from pipeline.options import Resolved
    from pipeline.stages.common import UpscaleOptions

    small, flux = get_preset("small"), get_preset("flux-2k")
    assert ensemble_shift(small, UpscaleOptions()) == 4 and ensemble_shift(small, UpscaleOptions(ensemble=False)) == 0
    assert ensemble_shift(flux, UpscaleOptions()) == 0
    with pytest.raises(BadParameter, match="RGB-conditioned"):
        ensemble_shift(flux, UpscaleOptions(ensemble=True))
    with pytest.raises(BadParameter, match="RGB-conditioned"):  # a preset file's default is checked the same way
        ensemble_shift(dataclasses.replace(flux, shift_ensemble=4), UpscaleOptions())
    work = lambda **o: small.sampling.work_factor(Resolved.of(UpscaleOptions(**o), small), (128, 128))  # noqa: E731
    assert Resolved.of(UpscaleOptions(), small).ensemble == 4  # entering resolves it: the shift in output pixels
    assert work() == pytest.approx(1 + (136 / 128) ** 2) and work(ensemble=False) == 1.0


def test_learning_rate_decays_by_steps_or_by_the_time_guard_whichever_is_first():
    from jobs.train_small import learning_rate

    assert learning_rate(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert learning_rate(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert learning_rate(55, 1.0, 10, 100) == pytest.approx(0.5)  # half the steps after warmup
    assert learning_rate(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    # a GPU run planned for many steps but stopped by --minutes: the time used drives the cosine
    assert learning_rate(20, 1.0, 10, 100_000, time_used=0.5) == pytest.approx(0.5)
    assert learning_rate(20, 1.0, 10, 100_000, time_used=1.2) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(55, 1.0, 10, 100, time_used=0.1) == pytest.approx(0.5)  # steps ahead of the clock
