"""Weights resolution: bundled, local hub-layout directory, and the offline error."""

import pytest

from pipeline.model.presets import get_preset
from pipeline.weights import WeightsNotFound, resolve


def test_offline_error_lists_missing_files_and_licence(tmp_path, monkeypatch):
    monkeypatch.delenv("PIDRAY_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(WeightsNotFound) as e:
        resolve(get_preset("flux-2k"), tmp_path)
    msg = str(e.value)
    assert "checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth" in msg
    assert "checkpoints/ae.safetensors" in msg and "hf download nvidia/PiD" in msg and "non-commercial" in msg


def test_local_hub_layout_resolves(tmp_path):
    p = get_preset("sd3-2kto4k")
    for rel in (p.checkpoint, p.vae_checkpoint):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = resolve(p, tmp_path)
    assert got["net"] == tmp_path / p.checkpoint and got["vae"] == tmp_path / p.vae_checkpoint


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="known: .*flux-2k"):
        get_preset("nope")


def test_job_preflight_fails_before_any_worker(tmp_path):
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "pidray.cli", "upscale", str(tmp_path / "in"), str(tmp_path / "out"), "-m", "flux-2k",
         "--weights", str(tmp_path)], capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "hf download nvidia/PiD" in out.stderr and "Traceback" not in out.stderr
    # every missing piece in the one message: the network, the VAE, and the caption encoder, each with its command
    p = get_preset("flux-2k")
    assert "2 things are missing" in out.stderr and p.checkpoint in out.stderr and p.vae_checkpoint in out.stderr
    assert "hf download Efficient-Large-Model/gemma-2-2b-it" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    weights = tmp_path / "w"
    for rel in (p.checkpoint, p.vae_checkpoint):
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / rel).write_bytes(b"x")
    out = subprocess.run(
        [sys.executable, "-m", "pidray.cli", "upscale", str(tmp_path / "in"), str(tmp_path / "out"), "-m", "flux-2k",
         "--weights", str(weights)], capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "--text-encoder DIR" in out.stderr
