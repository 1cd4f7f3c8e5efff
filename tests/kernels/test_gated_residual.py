import pytest
import torch

from pipeline.kernels.gated_residual import gated_residual, reference
from tests.kernels.helpers import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9, 40), (1, 5, 1536)])
def test_per_token_gate(shape, dtype):
    torch.manual_seed(0)
    x, y = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    gate = torch.randn(shape[0], 1, 6 * shape[2], dtype=dtype).chunk(6, -1)[2]
    assert_close(gated_residual(x, gate, y), reference(x, gate, y), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_pixel_gate_strided_and_noncontiguous_y(dtype):
    torch.manual_seed(1)
    x = torch.randn(6, 25, 3, dtype=dtype)
    gate = torch.randn(6, 25, 18, dtype=dtype).chunk(6, -1)[5]
    y = torch.randn(6, 3, 25, dtype=dtype).transpose(1, 2)  # non-contiguous
    assert_close(gated_residual(x, gate, y), reference(x, gate, y), dtype)
