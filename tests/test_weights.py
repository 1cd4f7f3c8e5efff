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
    assert "hf download Efficient-Large-Model/gemma-2-2b-it" in out.stderr
    first = out.stderr.splitlines()[0]  # a short first line says what is wrong; the commands follow below it
    assert first == "pidray upscale: error: 2 things are missing:", out.stderr
    assert all(len(line) <= 200 for line in out.stderr.splitlines() if "hf download" not in line), out.stderr
    weights = tmp_path / "w"
    for rel in (p.checkpoint, p.vae_checkpoint):
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / rel).write_bytes(b"x")
    out = subprocess.run(
        [sys.executable, "-m", "pidray.cli", "upscale", str(tmp_path / "in"), str(tmp_path / "out"), "-m", "flux-2k",
         "--weights", str(weights)], capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "--text-encoder DIR" in out.stderr


@pytest.mark.parametrize("name", ["dinov2-2k", "siglip-sr8x-2k"])
def test_representation_presets_name_their_encoder_sources(tmp_path, monkeypatch, name):
    """The RAE presets load their encoder from its own hub repository (and DINOv2 its latent statistics from the
    RAE release), as the official tokenizers do: offline, one error names every missing file with the command that
    gets it and each licence; laid out locally, they resolve to the folder and the file."""
    monkeypatch.delenv("PIDRAY_ALLOW_DOWNLOAD", raising=False)
    p = get_preset(name)
    repo = {"dinov2-2k": "facebook/dinov2-with-registers-base", "siglip-sr8x-2k": "google/siglip2-so400m-patch14-224"}
    with pytest.raises(WeightsNotFound) as e:
        resolve(p, tmp_path)
    msg = str(e.value)
    assert p.checkpoint in msg and "hf download nvidia/PiD" in msg and "non-commercial" in msg
    assert f"hf download {repo[name]} config.json model.safetensors --local-dir DIR/encoders/" in msg
    assert f"{repo[name]}: Apache-2.0" in msg
    assert ("nyu-visionx/RAE-collections" in msg) == (name == "dinov2-2k")
    (tmp_path / p.checkpoint).parent.mkdir(parents=True)
    (tmp_path / p.checkpoint).write_bytes(b"x")
    for f in p.encoder_files:
        for rel in [f"{f.local}/{n}" for n in f.files] or [f.local]:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(b"x")
    got = resolve(p, tmp_path)
    assert got["net"] == tmp_path / p.checkpoint and got["encoder"].is_dir() and "vae" not in got
    assert ("stats" in got) == (name == "dinov2-2k")
