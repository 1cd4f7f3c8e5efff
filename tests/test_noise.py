"""Counter-based canvas noise: standard-normal statistics, and an image's noise independent of its tile plan and
of the images batched beside it (also through the diffuse stage)."""

import numpy as np
import torch

from pipeline.noise import CanvasNoise, TileNoise
from pipeline.tiling import plan_tiles


def test_canvas_noise_is_standard_normal_and_uncorrelated():
    z = CanvasNoise(11, 3).region(2, 0, 0, 256, 256)
    assert z.dtype == torch.float32 and z.shape == (3, 256, 256) and torch.isfinite(z).all()
    flat = z.flatten().double()
    assert abs(flat.mean().item()) < 0.01 and abs(flat.std().item() - 1) < 0.01
    kurt = ((flat - flat.mean()) ** 4).mean() / flat.var() ** 2
    assert abs(kurt.item() - 3) < 0.1  # normal tails, not uniform-like (1.8)
    other = CanvasNoise(11, 3).region(3, 0, 0, 256, 256)  # the next draw
    for a, b in [(z[:, :, 1:], z[:, :, :-1]), (z[:, 1:], z[:, :-1]), (z[0], z[1]), (z, other),
                 (z, CanvasNoise(12, 3).region(2, 0, 0, 256, 256))]:  # fmt: skip
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < 0.01, r


def test_tensor_hash_is_the_integer_hash():
    """The int32 tensor mixer gives exactly the 32-bit integer hash (so every device gives the same integers)."""
    from pipeline.noise import _hash32, _s32, hash32

    vals = [0, 1, 2, 255, 1 << 31, (1 << 31) - 1, 0xFFFFFFFF, 0x9E3779B9, *range(1000, 1100)]
    got = _hash32(torch.tensor([_s32(v) for v in vals], dtype=torch.int32)).tolist()
    assert [g & 0xFFFFFFFF for g in got] == [hash32(v) for v in vals]
    assert len(set(got)) == len(vals)


def test_noise_does_not_depend_on_the_tile_plan():
    """The same canvas pixel gets the same noise whichever tiles cover it."""
    canvas = CanvasNoise(5, 3).region(1, 0, 0, 400, 300)
    for tile in (128, 192, 256):
        plan = plan_tiles((100, 75), unit=1, sr_scale=4, patch=8, tile_out=tile)
        origins = [(y * plan.out_per_lat, x * plan.out_per_lat) for y, x in plan.origins()]
        tiles = TileNoise(5, origins, plan.tile_out)(1)
        th, tw = plan.tile_out
        for t, (y, x) in zip(tiles, origins):
            h, w = min(th, 400 - y), min(tw, 300 - x)
            assert torch.equal(t[:, :h, :w], canvas[:, y : y + h, x : x + w])


def test_tiled_image_does_not_depend_on_its_batch_mates():
    """Through the real diffuse stage: a tiled image alone, and beside two others, comes out the same."""
    from pipeline.model.presets import get_preset
    from pipeline.stages.diffuse import DiffuseItem, DiffuseStage

    from conftest import random_net, tiny_config

    cfg = tiny_config()
    import dataclasses

    preset = dataclasses.replace(get_preset("flux-2k"), config=cfg, text_encoder="none")
    stage = DiffuseStage(loaded=(preset, random_net(cfg)), memory_budget=1 << 30)
    plan = plan_tiles((24, 40), unit=cfg.latent_spatial_down_factor, sr_scale=cfg.sr_scale, patch=cfg.patch_size,
                      tile_out=32, overlap=2)  # fmt: skip
    assert plan.n_tiles > 1
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(cfg.txt_max_length, cfg.txt_embed_dim)
    items = [DiffuseItem(torch.randn(cfg.lq_latent_channels, *plan.lat_hw, generator=g), y, plan, s, 0.2, 4)
             for s in (1, 2, 3)]  # fmt: skip
    alone = stage.diffuse_many(items[:1], steps=4)[0]
    together = stage.diffuse_many(items, steps=4)
    torch.testing.assert_close(together[0], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[1], alone, atol=1e-3)  # the mates are other images
