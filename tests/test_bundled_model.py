"""The bundled small model: present in the package, loads through the normal path, beats bicubic."""

import json
import subprocess
import sys

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
