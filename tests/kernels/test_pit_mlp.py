import pytest
import torch

from pipeline.kernels.pit_mlp import pit_mlp, reference
from tests.kernels.helpers import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("BL,P2,C", [(3, 64, 16), (5, 16, 4), (2, 9, 8), (1, 49, 12)])
def test_pit_mlp_matches_reference(BL, P2, C, dtype):
    torch.manual_seed(0)
    x = torch.randn(BL, P2, C, dtype=dtype)
    mod = torch.randn(BL, P2, 6 * C, dtype=dtype) * 0.5
    shift, scale, gate = mod.chunk(6, dim=-1)[3:]  # strided per-pixel views, as in the network
    nw = torch.randn(C, dtype=dtype)
    fc1_w, fc1_b = torch.randn(4 * C, C, dtype=dtype) * 0.3, torch.randn(4 * C, dtype=dtype) * 0.1
    fc2_w, fc2_b = torch.randn(C, 4 * C, dtype=dtype) * 0.3, torch.randn(C, dtype=dtype) * 0.1
    got = pit_mlp(x, nw, shift, scale, gate, fc1_w, fc1_b, fc2_w, fc2_b)
    ref = reference(x, nw, shift, scale, gate, fc1_w, fc1_b, fc2_w, fc2_b)
    assert_close(got, ref, dtype)


def test_pit_mlp_rejects_mismatched_weights():
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="do not fit pixel_dim 8"):
        pit_mlp(x, torch.ones(8), x, x, x, torch.zeros(32, 4), torch.zeros(32), torch.zeros(8, 32), torch.zeros(8))
