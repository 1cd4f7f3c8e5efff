"""A whole sampler step — network, x0, fusion of overlapping tiles, re-noise from the canvas noise — traces into one
graph (torch.compile fullgraph=True): no host syncs, no Python branches on tensor values, no generator."""

import torch

from pipeline.model.sampler import TIMESCALE, to_x0
from pipeline.noise import TileNoise
from pipeline.tiling import blend, crop_tiles, plan_tiles, tile_origins, tile_weights

from conftest import random_net, tiny_config


def test_a_tiled_sampler_step_compiles_without_graph_breaks():
    cfg = tiny_config()
    net = random_net(cfg).requires_grad_(False)
    plan = plan_tiles((24, 40), unit=4, sr_scale=2, patch=8, tile_out=32, overlap=2)  # 2 x 3 tiles of 32²
    assert plan.n_tiles > 1
    n, (th, tw) = plan.n_tiles, plan.tile_out
    origins = [(y * plan.out_per_lat, x * plan.out_per_lat) for y, x in plan.origins()]
    noise = TileNoise(7, origins, (th, tw))
    weights = (*tile_weights(plan), tile_origins(plan))
    torch.manual_seed(0)
    y = torch.randn(n, cfg.txt_max_length, cfg.txt_embed_dim)
    lat = torch.randn(n, cfg.lq_latent_channels, *plan.tile)
    sigma = torch.zeros(n)
    with torch.inference_mode():
        feats = net.encode_lq((th, tw), latent=lat)

    def step(x, t_cur: float, t_next: float, draw: int):
        t = torch.full((x.shape[0],), t_cur * TIMESCALE)
        x0 = to_x0(x, net(x, t, y, feats, sigma), t_cur, cfg.prediction_type)
        x0 = crop_tiles(blend(x0, plan, weights), plan)
        return (1.0 - t_next) * x0 + t_next * noise(draw)

    x = noise(0)
    with torch.inference_mode():
        eager = step(x, 0.866, 0.634, 1)
        compiled = torch.compile(step, fullgraph=True, backend="eager")(x, 0.866, 0.634, 1)  # raises on a break
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert eager.shape == (n, 3, th, tw) and not torch.equal(eager, x)
