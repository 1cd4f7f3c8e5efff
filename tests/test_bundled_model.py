"""The bundled small model: present in the package, loads through the normal path, beats bicubic."""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.model.loading import read_state_dict
from pipeline.model.presets import BUNDLED_DIR, get_preset
from pipeline.quality import evaluate_net
from pipeline.runtime import ModelOptions, load_net
from pipeline.weights import resolve

from conftest import ROOT


def test_bundled_weights_resolve_and_are_small():
    path = resolve(get_preset("small"))["net"]
    assert path.parent == BUNDLED_DIR and path.stat().st_size <= 25 * 2**20
    _, meta = read_state_dict(path)
    assert meta["preset"] == "small" and int(meta["steps"]) > 0 and json.loads(meta["train_log"])
    assert (BUNDLED_DIR / "MODEL_CARD.md").is_file()


def test_beats_bicubic_on_a_held_out_photo_at_reduced_size():
    torch.manual_seed(0)
    _, net = load_net(ModelOptions(device="cpu", dtype="fp32"), get_preset("small"))
    res = evaluate_net(net, size=96, seed=0, steps=get_preset("small").default_steps)
    for r in res["rows"]:
        print(f"{r['image']}: model {r['psnr_model']:.2f} dB vs bicubic {r['psnr_bicubic']:.2f} dB")
    assert any(r["psnr_model"] > r["psnr_bicubic"] + 0.1 for r in res["rows"])


def test_readme_main_command_on_the_bundled_samples(tmp_path):
    """`pidray upscale pipeline/assets/samples out` (here in-process, --local) upscales every sample 4×."""
    from PIL import Image

    samples = ROOT / "pipeline" / "assets" / "samples"
    out = subprocess.run(
        [sys.executable, "-m", "pidray.cli", "upscale", str(samples), str(tmp_path), "--local"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    inputs = sorted(p for p in samples.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(inputs) >= 3 and "3 ok, 0 failed" in out.stdout
    for p in inputs:
        src, dst = Image.open(p), Image.open(tmp_path / p.name)
        assert dst.size == (src.size[0] * 4, src.size[1] * 4)


def test_grid_ratio_sees_a_patch_grid_and_nothing_else():
    """The grid ratio of eval-small: an 8-pixel grid added to an upscale shows (> 1.3); the same amount of detail
    without a grid, or a grid of another period, reads ~1.0."""
    import torch

    from pipeline.quality import bicubic_up, grid_ratio

    g = torch.Generator().manual_seed(0)
    lq = torch.rand(3, 32, 32, generator=g) * 2 - 1
    up = bicubic_up(lq[None])[0]
    noise = torch.randn(3, 128, 128, generator=g) * 0.02
    blocks = torch.randn(16, 16, generator=g) * 0.02  # an offset per 8x8 block: the blockiness of a patch grid
    gridded = up + noise + torch.kron(blocks, torch.ones(8, 8))[None]
    assert grid_ratio(gridded.clamp(-1, 1), lq, 8) > 1.3
    assert abs(grid_ratio((up + noise).clamp(-1, 1), lq, 8) - 1.0) < 0.1
    assert abs(grid_ratio(gridded.clamp(-1, 1), lq, 6) - 1.0) < 0.15


def test_the_default_tile_is_as_good_as_the_trained_one_and_needs_fewer_tiles():
    """The small model's default tile (chosen for speed on a CPU) keeps every sample within 45 dB PSNR of the
    output at the tile it was trained at, and diffuses each in fewer tiles."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.graph import StageGraph
    from pipeline.stages import UpscaleOptions
    from pipeline.stages.encode import plan_for

    preset = get_preset("small")
    assert preset.default_tile and preset.default_tile > preset.envelope[1]
    trained = StageGraph(ModelOptions(), UpscaleOptions(tile=preset.envelope[1]))
    default = StageGraph(ModelOptions(), UpscaleOptions())
    stages = {g: g.build_all() for g in (trained, default)}
    for name in ("chelsea.png", "coffee.jpg"):
        data = (ROOT / "pipeline" / "assets" / "samples" / name).read_bytes()
        outs = []
        for g in (trained, default):
            row = next(g.run_local([{"key": name, "bytes": data}], stages[g]))
            assert row["status"] == "ok", row
            outs.append(np.asarray(Image.open(io.BytesIO(row["output"])).convert("RGB"), dtype=np.float64))
        psnr = 10 * np.log10(255.0**2 / max(np.mean((outs[0] - outs[1]) ** 2), 1e-12))
        assert psnr >= 45.0, (name, psnr)
        hw = Image.open(io.BytesIO(data)).size[::-1]
        assert plan_for(preset, default.options, hw).n_tiles < plan_for(preset, trained.options, hw).n_tiles


@pytest.mark.slow
def test_eval_small_sweep_measures_speed_and_quality_against_the_trained_tile():
    """`pidray eval-small --sweep`'s search, one candidate: every setting is timed and compared with the model at
    its trained tile; the reference is itself exactly, and a faster setting replaces it only when it passes."""
    from jobs.eval_small import SWEEP_MIN_DB, sweep

    lines = []
    res = sweep(None, tiles=[256], calls=[4], threads=[torch.get_num_threads()], runs=1, size=64, show=lines.append)
    ref, cand = res["rows"]
    assert ref["tile"] == get_preset("small").envelope[1] and ref["min_psnr_db"] == float("inf") and ref["passes"]
    assert cand["tile"] == 256 and cand["s_per_mpx"] > 0 and cand["speedup"] > 0 and len(lines) == 2
    assert cand["passes"] == (cand["min_psnr_db"] >= SWEEP_MIN_DB and cand["grid_ratio"] <= ref["grid_ratio"] + 0.02)
    assert res["best"] in (ref, cand) and (res["best"] is ref or cand["passes"])
