"""How a preset samples is one object (`pipeline.model.sampling`), the sampler loop included: the diffuse stage asks it
which loop runs and what the loop needs, so a new sampler is its loop module and its class."""

import ast
import dataclasses
from pathlib import Path

import torch

from pipeline.model import sampling
from pipeline.model.presets import get_preset
from pipeline.model.sampler import to_x0
from pipeline.stages import UpscaleOptions
from pipeline.stages.diffuse import DiffuseStage
from pipeline.tiling import plan_tiles

from conftest import random_net, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_diffuse_stage_names_no_sampler_loop():
    """diffuse.py imports no loop and asks no sampler's kind (`.guided`): the loop, whether rows need the null
    caption and what a warm-up step runs come from `preset.sampling`."""
    tree = ast.parse((ROOT / "pipeline/stages/diffuse.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not imported & {"sample", "guided_sample", "dpm_solver_pp"}, imported
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "guided" not in attrs and {"run", "null_caption", "warm_guidance"} <= attrs


class OneStep(sampling.Sampling):
    """A sampler that is nothing but its class: one x0 prediction from the initial noise taken as x at t = 1/2 (no
    sampler of the presets does that)."""

    name = "test-one-step"

    def run(self, predict, noise, *, steps, guidance, options, prediction, dtype, on_x0=None, should_stop=None):
        x = noise(0)
        x0 = to_x0(x, predict(x, torch.full((x.shape[0],), 500.0, device=x.device)), 0.5, prediction)
        return (on_x0(steps - 1, x0) if on_x0 is not None else x0).clamp(-1, 1)


def test_a_new_sampler_is_one_class(monkeypatch):
    """A Sampling subclass in SAMPLINGS, named by a preset, is what the diffuse stage runs, one tile or several."""
    monkeypatch.setitem(sampling.SAMPLINGS, OneStep.name, OneStep)
    cfg = tiny_config()
    preset = dataclasses.replace(get_preset("flux-2k"), config=cfg, text_encoder="none", sampler=OneStep.name)
    net = random_net(cfg)
    stage = DiffuseStage(options=UpscaleOptions(steps=1), loaded=(preset, net), memory_budget=1 << 30)
    assert isinstance(stage.preset.sampling, OneStep)
    unit = dict(unit=cfg.latent_spatial_down_factor, sr_scale=cfg.sr_scale, patch=cfg.patch_size)
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(cfg.txt_max_length, cfg.txt_embed_dim)

    plan = plan_tiles((16, 16), **unit, tile_out=32, overlap=2)  # one tile: the official noise from the seed
    assert plan.n_tiles == 1
    lat = torch.randn(cfg.lq_latent_channels, *plan.lat_hw, generator=g)
    got = stage.diffuse(lat, y, plan, seed=5, sigma=0.0)
    with torch.inference_mode():
        x = torch.randn(1, 3, *plan.tile_out, generator=torch.Generator().manual_seed(5))
        feats = net.encode_lq(plan.tile_out, latent=lat[None])
        pred = net(x, torch.full((1,), 500.0), y[None], feats, torch.zeros(1))
        want = to_x0(x, pred.float(), 0.5, cfg.prediction_type).clamp(-1, 1)[0]
    assert torch.equal(got, want)

    plan = plan_tiles((24, 40), **unit, tile_out=32, overlap=2)  # tiles: blended through the sampler's on_x0
    assert plan.n_tiles > 1
    out = stage.diffuse(torch.randn(cfg.lq_latent_channels, *plan.lat_hw, generator=g), y, plan, seed=5, sigma=0.0)
    assert out.shape == (3, *plan.out_hw) and out.abs().max() <= 1
