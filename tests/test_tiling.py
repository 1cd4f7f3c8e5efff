"""Tile planning, partition-of-unity blending, coordinate-keyed noise, and tiled ≈ untiled without seams."""

import pytest
import torch

from pipeline.noise import CanvasNoise, TileNoise, file_seed
from pipeline.tiling import blend, crop_tiles, plan_tiles, tile_weights


@pytest.mark.parametrize("hw", [(1, 1), (2, 700), (45, 71), (640, 480), (97, 33)])
@pytest.mark.parametrize("unit,sr,patch,tile", [(1, 4, 8, 128), (8, 4, 16, 2048), (16, 8, 16, 2048)])
def test_plan_covers_input_with_one_tile_shape(hw, unit, sr, patch, tile):
    plan = plan_tiles(hw, unit=unit, sr_scale=sr, patch=patch, tile_out=tile)
    assert plan.out_hw == (hw[0] * sr, hw[1] * sr)
    assert all(c >= o for c, o in zip(plan.canvas_hw, plan.out_hw))
    assert all(p >= i for p, i in zip(plan.pad_hw, hw))
    assert all(t % patch == 0 for t in plan.tile_out)  # whole patches
    assert all(t * plan.out_per_lat <= max(tile, patch) for t in plan.tile)
    last = plan.origins()[-1]
    assert (last[0] + plan.tile[0], last[1] + plan.tile[1]) == plan.lat_hw  # tiles end exactly at the canvas edge


def test_small_image_is_one_tile_and_overlap_default():
    assert plan_tiles((512, 384), unit=8, sr_scale=4, patch=16, tile_out=2048).n_tiles == 1
    big = plan_tiles((1000, 700), unit=8, sr_scale=4, patch=16, tile_out=2048)
    assert big.grid == (3, 2) and big.overlap == (8, 8) and big.overlap[0] * big.out_per_lat == 256


def test_presets_carry_their_overlap():
    """--overlap defaults to the preset's (data, not a global): 160 output pixels for the released ones."""
    from pipeline.model.presets import get_preset
    from pipeline.stages import UpscaleOptions
    from pipeline.stages.encode import plan_for

    flux = plan_for(get_preset("flux-2k"), UpscaleOptions(), (1000, 1500))
    assert flux.overlap == (5, 5) and flux.overlap[0] * flux.out_per_lat == 160
    assert plan_for(get_preset("small"), UpscaleOptions(), (100, 100)).overlap == (8, 8)
    assert plan_for(get_preset("flux-2k"), UpscaleOptions(overlap=3), (1000, 1500)).overlap == (3, 3)


def test_blend_is_a_partition_of_unity():
    plan = plan_tiles((100, 70), unit=1, sr_scale=4, patch=8, tile_out=128)
    assert plan.n_tiles > 4
    tiles = torch.full((plan.n_tiles, 3, *plan.tile_out), 0.25)
    canvas = blend(tiles, plan)
    assert torch.allclose(canvas, torch.full_like(canvas, 0.25), atol=1e-6)
    # consistent tiles survive blend -> crop unchanged
    ramp = torch.linspace(-1, 1, plan.canvas_hw[1]).expand(3, *plan.canvas_hw)
    tiles = crop_tiles(ramp, plan)
    assert torch.allclose(crop_tiles(blend(tiles, plan), plan), tiles, atol=1e-6)
    wy, wx = tile_weights(plan)
    assert wy.shape == (plan.n_tiles, plan.tile_out[0]) and float(wy.min()) > 0 and float(wx.min()) > 0


def test_canvas_noise_is_keyed_to_global_coordinates():
    cells = CanvasNoise(seed=5, channels=3)
    whole = cells.region(1, 0, 0, 200, 150)
    part = cells.region(1, 70, 33, 90, 100)
    assert torch.equal(whole[:, 70:160, 33:133], part)
    assert not torch.equal(cells.region(2, 70, 33, 90, 100), part)  # each draw is fresh
    tn = TileNoise(5, [(0, 0), (0, 96)], (128, 128))(1)
    assert torch.equal(tn[0][:, :, 96:], tn[1][:, :, :32])  # overlapping tiles see the same noise
    assert whole.std().item() == pytest.approx(1.0, abs=0.05)


def test_file_seed_depends_on_run_seed_and_key_only():
    assert file_seed(0, "a/b.png") == file_seed(0, "a/b.png")
    assert file_seed(0, "a/b.png") != file_seed(1, "a/b.png") != file_seed(0, "a/c.png")


@pytest.mark.parametrize(
    "preset,hw,goal",
    [
        ("flux-2k", (1024, 1024), 1.15),
        ("flux-2k", (2048, 2048), 1.15),
        ("flux-2k", (1000, 1500), 1.15),
        ("flux-2kto4k-v1.5", (2048, 2048), 1.15),
    ],
)
def test_even_split_diffuses_close_to_the_output(preset, hw, goal):
    """Issue 11: the fewest tiles that cover, split evenly, instead of envelope-sized tiles padding the last one."""
    from pipeline.model.presets import get_preset
    from pipeline.stages import UpscaleOptions
    from pipeline.stages.encode import plan_for
    from pipeline.tiling import diffused_pixels

    p = get_preset(preset)
    plan = plan_for(p, UpscaleOptions(max_output_side=1 << 20), hw)
    ratio = diffused_pixels(plan) / (plan.out_hw[0] * plan.out_hw[1])
    cfg = p.config
    old = plan_tiles(hw, unit=cfg.latent_spatial_down_factor, sr_scale=cfg.sr_scale, patch=cfg.patch_size,
                     tile_out=p.envelope[1], tile_min_out=p.envelope[1], max_output_side=1 << 20)  # fmt: skip
    print(f"{preset} {hw}: {plan.grid} tiles of {plan.tile_out}, diffused/output {ratio:.3f} (envelope-sized tiles: "
          f"{diffused_pixels(old) / (plan.out_hw[0] * plan.out_hw[1]):.3f})")  # fmt: skip
    assert ratio <= goal and diffused_pixels(plan) < diffused_pixels(old)
    assert all(p.envelope[0] <= t <= p.envelope[1] for t in plan.tile_out)  # inside the trained envelope
    lat = plan.lat_hw
    assert all(c >= -(-v // plan.unit) for c, v in zip(lat, hw))  # still covers the image


@pytest.mark.parametrize("preset", ["flux-2k", "flux-2kto4k-v1.5"])
@pytest.mark.parametrize("hw", [(1, 1), (300, 200), (1024, 1024), (640, 1536), (2000, 3000)])
def test_bucketed_plans_cover_the_image_with_bucket_shapes(preset, hw):
    import math

    from pipeline.model.presets import get_preset
    from pipeline.stages import UpscaleOptions
    from pipeline.stages.encode import plan_for
    from pipeline.tiling import MAX_BUCKET_SHAPES, bucket_shapes

    p = get_preset(preset)
    plan = plan_for(p, UpscaleOptions(tile_buckets=True, max_output_side=1 << 20), hw)
    per = plan.out_per_lat
    m = p.config.patch_size // math.gcd(p.config.patch_size, per)
    shapes = bucket_shapes(*p.envelope, per, m, p.lq_unit, -(-p.tile_overlap // m) * m)
    assert len(shapes) == MAX_BUCKET_SHAPES and plan.tile in shapes  # whatever the image size, one of six shapes
    assert all(p.envelope[0] <= t * per <= p.envelope[1] and (t * per) % 128 == 0 for s in shapes for t in s)
    assert all(c >= -(-v // plan.unit) for c, v in zip(plan.lat_hw, hw))  # covers the image
    last = plan.origins()[-1]
    assert (last[0] + plan.tile[0], last[1] + plan.tile[1]) == plan.lat_hw  # tiles end at the canvas edge
    assert all(o >= p.tile_overlap for o, n in zip(plan.overlap, plan.grid) if n > 1)


@pytest.mark.parametrize("preset", ["flux-2k", "flux-2kto4k-v1.5"])
def test_warmup_covers_every_bucketed_tile_shape(preset):
    """With --tile-buckets the diffuse stage warms exactly the bucket shapes, and the 20 common sizes plus odd ones
    all plan into them: a long job compiles nothing after its replica said ready."""
    from types import SimpleNamespace

    from pipeline.model.presets import get_preset
    from pipeline.options import Resolved
    from pipeline.stages import DiffuseStage, UpscaleOptions
    from pipeline.stages.encode import plan_for
    from pipeline.tiling import COMMON_SIZES

    p = get_preset(preset)
    sizes = [(h, w) for w, h in COMMON_SIZES] + [(1, 1), (333, 4001), (2999, 17), (1500, 1500)]
    for tile in (None, 2048):  # --tile changes the shapes: the warm-up follows
        o = Resolved.of(UpscaleOptions(tile_buckets=True, max_output_side=1 << 20, tile=tile), p)  # as the stage's
        warm = DiffuseStage.warm_shapes(SimpleNamespace(net=SimpleNamespace(cfg=p.config), preset=p, options=o))
        assert len(set(warm)) <= 6 and {plan_for(p, o, hw).tile for hw in sizes} <= set(warm), tile
