"""The distilled sampler with a stub model: schedule, draw order, SDE/ODE, x0 presets, latent degradation."""

import pytest
import torch

from pipeline.model.sampler import DISTILLED_T, GeneratorNoise, degrade_latent, sample, t_schedule


def test_schedule_subsampling_follows_official_index_rule():
    assert t_schedule(4) == list(DISTILLED_T)
    assert t_schedule(2) == [0.999, 0.634, 0.0]
    assert t_schedule(3) == [0.999, 0.866, 0.342, 0.0]  # linspace(0,4,4).round() = [0,1,3,4]
    assert t_schedule(1) == [1.0, 0.0]  # the official one-step path starts at t = 1
    for bad in (0, 5, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer in 1..4"):
            t_schedule(bad)


class Recorder:
    def __init__(self, out):
        self.calls, self.out = [], out

    def __call__(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.out(x, t)


def test_sde_draw_order_and_renoise_formula():
    shape = (2, 3, 4, 4)
    v = torch.full(shape, 0.25)
    rec = Recorder(lambda x, t: v)
    out = sample(rec, GeneratorNoise(shape, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(shape, generator=g) for _ in range(4)]
    assert torch.equal(rec.calls[0][0], draws[0])
    assert [round(c[1][0].item(), 3) for c in rec.calls] == [999.0, 866.0, 634.0, 342.0]
    x0 = (draws[0].double() - 0.999 * v.double()).float()
    assert torch.allclose(rec.calls[1][0], (1 - 0.866) * x0 + 0.866 * draws[1])
    x_last = rec.calls[-1][0]
    assert torch.allclose(out, (x_last - 0.342 * v).clamp(-1, 1))


def test_ode_variant_makes_no_extra_draws():
    shape = (1, 3, 2, 2)
    counter = {"n": 0}

    def noise(i):
        counter["n"] += 1
        return torch.ones(shape)

    out = sample(lambda x, t: torch.full(shape, 0.5), noise, mode="ode")
    assert counter["n"] == 1
    # x = 1 + (t_last - t0)·0.5 then x0 = x - 0.342·0.5
    assert torch.allclose(out, torch.full(shape, 1 + (0.342 - 0.999) * 0.5 - 0.342 * 0.5))


def test_x0_prediction_and_fusion_hook():
    shape = (1, 3, 2, 2)
    seen = []

    def hook(i, x0):
        seen.append(i)
        return x0 * 0 + 0.1

    out = sample(lambda x, t: torch.zeros(shape), GeneratorNoise(shape, torch.Generator()), prediction="x0", on_x0=hook)
    assert seen == [0, 1, 2, 3] and torch.allclose(out, torch.full(shape, 0.1))


def test_degrade_latent_flow_and_vp():
    z, eps = torch.ones(4), torch.full((4,), 2.0)
    assert torch.allclose(degrade_latent(z, 0.25, eps), torch.full((4,), 0.75 + 0.5))
    assert torch.allclose(degrade_latent(z, 0.6, eps, variance_preserving=True), torch.full((4,), 0.8 + 1.2))
    assert degrade_latent(z, 0.0, eps) is z
    with pytest.raises(ValueError, match=r"degrade_sigma must be in \[0, 1\], got 1.5"):
        degrade_latent(z, 1.5, eps)
