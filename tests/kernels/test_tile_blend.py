import pytest
import torch

from pipeline.kernels.tile_blend import reference, tile_blend
from pipeline.tiling import plan_tiles, tile_weights


@pytest.mark.parametrize("hw", [(50, 70), (33, 9)])
def test_tile_blend_matches_reference(hw):
    plan = plan_tiles(hw, unit=1, sr_scale=4, patch=8, tile_out=64)
    assert plan.n_tiles > 1
    torch.manual_seed(0)
    tiles = torch.randn(plan.n_tiles, 3, *plan.tile_out)
    wy, wx = tile_weights(plan)
    origins = torch.tensor([(y * plan.out_per_lat, x * plan.out_per_lat) for y, x in plan.origins()])
    got = tile_blend(tiles, wy, wx, origins, plan.canvas_hw)
    ref = reference(tiles, wy, wx, origins, plan.canvas_hw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
