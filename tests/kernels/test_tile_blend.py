import numpy as np
import pytest
import torch

from pipeline.kernels import reference
from pipeline.kernels.tile_blend import tile_blend
from pipeline.tiling import feather, plan_tiles


@pytest.mark.parametrize("hw", [(50, 70), (33, 9)])
def test_tile_blend_matches_reference(hw):
    plan = plan_tiles(hw, unit=1, sr_scale=4, patch=8, tile_out=64)
    assert plan.n_tiles > 1
    torch.manual_seed(0)
    th, tw = plan.tile_out
    tiles = torch.randn(plan.n_tiles, 3, th, tw)
    ovy, ovx = (o * plan.out_per_lat for o in plan.overlap)
    wy, wx = [], []
    for i in range(plan.grid[0]):
        for j in range(plan.grid[1]):
            wy.append(feather(th, ovy if i else 0, ovy if i < plan.grid[0] - 1 else 0))
            wx.append(feather(tw, ovx if j else 0, ovx if j < plan.grid[1] - 1 else 0))
    wy, wx = torch.from_numpy(np.stack(wy)).float(), torch.from_numpy(np.stack(wx)).float()
    origins = torch.tensor([(y * plan.out_per_lat, x * plan.out_per_lat) for y, x in plan.origins()])
    got = tile_blend(tiles, wy, wx, origins, plan.canvas_hw)
    ref = reference.tile_blend(tiles, wy, wx, origins, plan.canvas_hw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
