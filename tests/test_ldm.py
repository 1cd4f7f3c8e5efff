"""Generate-then-decode (issue 14): a tiny random diffusers Z-Image pipeline makes the latent, PiD decodes it."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save as st_save
from test_encoders import stand_in  # noqa: F401

from pipeline.graph import StageGraph
from pipeline.stages import UpscaleOptions

from conftest import ROOT, make_tiny_zimage

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    return make_tiny_zimage(tmp_path_factory.mktemp("zimage"))


def _px(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_zimage_latent_handed_to_pid_is_the_decode_of_that_latent(stand_in, zimage):  # noqa: F811
    """The ldm workflow's image is exactly `pidray decode` of the latent the pipeline returns with
    output_type="latent" (same seed, the prompt as PiD's caption): the hand-off is the latent itself, unchanged."""
    import torch

    opts = stand_in("flux-2k")
    options = UpscaleOptions(overlap=1, seed=5)
    g = StageGraph(opts, options, "ldm", gen={"steps": 2, "cfg_scale": 0.0, "size": (64, 48)}, ldm=str(zimage))
    (row,) = list(g.run_local([{"key": "p", "prompt": "a cat sleeping", "seed": 5}]))
    assert row["status"] == "ok", row.get("error")
    assert row["out_hw"] == [256, 192]
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(zimage))
    pipe.set_progress_bar_config(disable=True)
    lat = pipe(
        "a cat sleeping",
        height=64,
        width=48,
        num_inference_steps=2,
        guidance_scale=0.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(5),
        max_sequence_length=512,
    ).images[0]
    assert lat.shape == (16, 8, 6) and lat.abs().sum() > 0
    dec = StageGraph(opts, options, "decode")
    (ref,) = list(dec.run_local([{"key": "z.safetensors", "bytes": st_save({"z": lat.contiguous()}),
                                  "caption": "a cat sleeping"}]))  # fmt: skip
    assert np.array_equal(_px(row["output"]), _px(ref["output"]))


def test_cli_generate_with_a_diffusers_folder(golden_dir, zimage, tmp_path):
    """`pidray generate --with DIR PROMPT OUT -m PRESET`: one command, the PiD preset as a preset file; a model whose
    latents the preset cannot decode is refused before anything loads."""
    from test_encoders import build_stand_in

    build_stand_in("flux-2k", golden_dir, tmp_path / "flux")
    preset = str(tmp_path / "flux" / "preset.json")
    out = tmp_path / "a.png"
    args = ["--with", str(zimage), "a cat", str(out), "-m", preset, "--weights", str(tmp_path / "flux"), "--steps",
            "2", "--size", "48x32", "--cfg-scale", "0", "--no-progress"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "pidray.cli", "generate", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (192, 128)
    build_stand_in("sdxl-2kto4k", golden_dir, tmp_path / "sdxl")
    args = ["--with", str(zimage), "a cat", str(tmp_path / "b.png"), "-m", str(tmp_path / "sdxl" / "preset.json"),
            "--weights", str(tmp_path / "sdxl"), "--no-progress"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "pidray.cli", "generate", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 2 and "does not fit" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stop_at_is_the_decode_of_the_x_t_captured_after_k_steps(stand_in, zimage):  # noqa: F811
    """--stop-at K: the image equals `pidray decode --sigma σ_K` of the x_t the pipeline held after K of its steps
    (captured here by a callback of the test's own); the manifest's notes say K and σ."""
    import torch
    from safetensors.torch import save as st_save

    opts = stand_in("flux-2k")
    options = UpscaleOptions(overlap=1, seed=5)
    gen = {"steps": 3, "cfg_scale": 0.0, "size": (64, 48), "stop_at": 2}
    (row,) = list(StageGraph(opts, options, "ldm", gen=gen, ldm=str(zimage)).run_local(
        [{"key": "p", "prompt": "a cat sleeping", "seed": 5}]))  # fmt: skip
    assert row["status"] == "ok", row.get("error")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(zimage))
    pipe.set_progress_bar_config(disable=True)
    held = {}

    def keep(p, i, t, kw):
        held.setdefault(i, (kw["latents"][0].clone(), float(p.scheduler.sigmas[i + 1])))
        return kw

    pipe("a cat sleeping", height=64, width=48, num_inference_steps=3, guidance_scale=0.0, output_type="latent",
         generator=torch.Generator().manual_seed(5), max_sequence_length=512, callback_on_step_end=keep)  # fmt: skip
    xt, sigma = held[1]
    assert 0 < sigma < 1 and any(f"after step 2 of 3, sigma {sigma:.6g}" in n for n in row["notes"])
    dec = StageGraph(opts, options, "decode")
    (ref,) = list(dec.run_local([{"key": "x.safetensors", "bytes": st_save({"z": xt.contiguous()}), "sigma": sigma,
                                  "caption": "a cat sleeping"}]))  # fmt: skip
    assert ref["status"] == "ok", ref.get("error")
    assert np.array_equal(_px(row["output"]), _px(ref["output"]))


def test_stop_at_out_of_range_is_one_line_before_anything_loads():
    r = subprocess.run([sys.executable, "-m", "pidray.cli", "generate", "--with", "zimage-turbo", "--stop-at", "12",
                        "a cat", "never.png", "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "stop_at 12 is past the last of the generator's 9 steps" in r.stderr and len(r.stderr.splitlines()) == 1


def test_generator_stage_declares_its_gpu_share_and_memory():
    """A 12B+ generator takes a card of its own on a cluster; offloaded, or a small one, shares it with PiD."""
    from pipeline.model.presets import get_preset
    from pipeline.runtime import ModelOptions
    from pipeline.workflow import resolve_workflow

    def ldm_stage(name, offload=False):
        wf = resolve_workflow("ldm", ModelOptions(GENERATORS[name].preset), UpscaleOptions(), ldm=name,
                              offload=offload)  # fmt: skip
        return wf.stages()[0]

    from pipeline.generators import GENERATORS

    flux = ldm_stage("flux")
    assert flux.gpu_share == 1.0 and flux.memory(None) > 30e9 and flux.wants_gpu and flux.holds_model
    off = ldm_stage("flux", offload=True)
    assert off.gpu_share == 0.5 and off.memory(None) < flux.memory(None) and off.kwargs["offload"] is True
    assert ldm_stage("sdxl").gpu_share == 0.5
    assert get_preset(GENERATORS["flux2-klein-9b"].preset).vae == "flux2"
