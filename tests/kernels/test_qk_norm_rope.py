import pytest
import torch

from pipeline.kernels.qk_norm_rope import qk_norm_rope, reference
from pipeline.model.math import rope_2d
from tests.kernels.helpers import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,gh,gw,H,hd", [(2, 3, 5, 2, 16), (1, 4, 4, 3, 72), (1, 1, 7, 1, 12)])
def test_qk_norm_rope_on_strided_qkv_views(B, gh, gw, H, hd, dtype):
    torch.manual_seed(0)
    N = gh * gw
    qkv = torch.randn(B, N, 3 * H * hd, dtype=dtype)
    q, k, _ = qkv.view(B, N, 3, H, hd).unbind(2)  # strided, as in the attention modules
    wq, wk = torch.randn(hd, dtype=dtype), torch.randn(hd, dtype=dtype)
    rope = rope_2d(hd, gh, gw, ntk_ref=(2, 2))
    gq, gk = qk_norm_rope(q, k, wq, wk, rope)
    rq, rk = reference(q, k, wq, wk, rope)
    assert_close(gq, rq, dtype)
    assert_close(gk, rk, dtype)


def test_odd_head_dim_is_refused():
    q = torch.zeros(1, 2, 1, 5)
    with pytest.raises(ValueError, match="even head dim"):
        qk_norm_rope(q, q, torch.ones(5), torch.ones(5), (torch.zeros(2, 2), torch.zeros(2, 2)))
