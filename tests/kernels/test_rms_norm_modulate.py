import pytest
import torch

from pipeline.kernels.rms_norm_modulate import norm_modulate, rms_norm, rms_norm_modulate
from tests.kernels.helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,D", [(2, 7, 48), (1, 33, 130), (3, 1, 1536)])
def test_per_token_modulation(B, L, D, dtype):
    torch.manual_seed(0)
    x = torch.randn(B, L, D, dtype=dtype)
    w = torch.randn(D, dtype=dtype)
    mod = torch.randn(B, 1, 6 * D, dtype=dtype)  # the patch block's modulation output
    shift, scale = mod.chunk(6, dim=-1)[:2]  # strided [B, 1, D] views
    got = rms_norm_modulate(x, w, shift, scale)
    assert_close(got, norm_modulate(x, w, shift, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("BL,P2,C", [(5, 16, 4), (3, 64, 16), (7, 9, 11)])
def test_per_pixel_modulation_on_strided_chunks(BL, P2, C, dtype):
    torch.manual_seed(1)
    x = torch.randn(BL, P2, C, dtype=dtype)
    w = torch.randn(C, dtype=dtype)
    mod = torch.randn(BL, P2, 6 * C, dtype=dtype)  # PiT: [B·L, p², 6·d] -> chunks are strided
    shift, scale = mod.chunk(6, dim=-1)[3:5]
    assert not shift.is_contiguous()
    assert_close(rms_norm_modulate(x, w, shift, scale), norm_modulate(x, w, shift, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_rms_norm_and_noncontiguous_input(dtype):
    torch.manual_seed(2)
    base = torch.randn(4, 10, 3, 2, 24, dtype=dtype)
    x = base[:, :, 1]  # non-contiguous [4, 10, 2, 24]
    w = torch.randn(24, dtype=dtype)
    assert_close(rms_norm_modulate(x, w), rms_norm(x, w), dtype)


def test_block_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="last dimension 70000 exceeds"):
        rms_norm_modulate(torch.zeros(1, 70000), torch.ones(70000))
