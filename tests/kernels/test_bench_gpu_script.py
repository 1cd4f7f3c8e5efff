"""The GPU benchmark script runs end to end (tiny config, CPU interpreter) and counts FLOPs sensibly."""

import pytest

from jobs import bench_gpu
from pipeline.model.presets import get_preset


def test_flop_count_of_the_released_network():
    cfg = get_preset("flux-2k").config
    f2k = bench_gpu.forward_flops(cfg, 2048, 2048, 300)
    f4k = bench_gpu.forward_flops(cfg, 3840, 3840, 300)
    params = 1.36e9
    # ~2 FLOPs per parameter per patch token (16384 tokens) is the floor; attention adds more at 4K
    assert 2 * params * 16384 * 0.8 < f2k < 2 * params * 16384 * 4
    assert f4k / f2k > (3840 / 2048) ** 2  # attention grows faster than the pixel count
    print(f"forward FLOPs: 2048² {f2k / 1e12:.1f} TFLOP, 3840² {f4k / 1e12:.1f} TFLOP")


@pytest.mark.slow
def test_script_runs_tiny_on_cpu(capsys):
    assert bench_gpu.main(["--tiny", "--sizes", "32", "--reps", "1", "--no-compile", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pit_mlp sub-block" in out and "forward triton" in out and "forward eager" in out
