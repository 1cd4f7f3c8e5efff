"""The generators of generate-then-decode: the registry (ten names, their PiD presets, hostile names and folders), and
the packed latents of Flux, Flux2, Flux2-klein and Qwen-Image laid out as the tensor PiD's LQ encoder produces —
each checked against a tiny random pipeline of the real diffusers class and that class's own unpacking."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import SetupError
from pipeline.generators import GENERATORS, generator_spec
from pipeline.latents import FORMATS, check_format
from pipeline.model.presets import get_preset

from conftest import ROOT

NAMES = ["flux", "flux2", "flux2-klein-4b", "flux2-klein-9b", "qwenimage", "qwenimage-2512", "zimage",
         "zimage-turbo", "sd3", "sdxl"]  # fmt: skip


def test_registry_names_the_ten_with_a_preset_that_decodes_each():
    assert list(GENERATORS) == NAMES
    for g in GENERATORS.values():
        preset = get_preset(g.preset)
        check_format(g.family, preset)  # the paired PiD preset decodes this generator's latents
        assert g.step_format in FORMATS and preset.task == "upscale"
    assert GENERATORS["flux2-klein-4b"].preset == GENERATORS["flux2-klein-9b"].preset == GENERATORS["flux2"].preset
    assert GENERATORS["qwenimage-2512"].preset == GENERATORS["qwenimage"].preset
    assert GENERATORS["zimage-turbo"].defaults() == {"steps": 9, "cfg_scale": 0.0, "size": [1024, 1024],
                                                     "multiple": 16, "name": "zimage-turbo"}  # fmt: skip
    assert GENERATORS["sdxl"].multiple == 8
    assert dict(GENERATORS["qwenimage"].extra)["negative_prompt"] == " "
    assert GENERATORS["qwenimage"].cfg_arg == "true_cfg_scale"


def test_unknown_name_and_hostile_folders_are_one_line_before_anything_loads(tmp_path):
    with pytest.raises(SetupError, match="did you mean 'flux2-klein-4b'"):
        generator_spec("flux2-klein-4")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "vae": ["diffusers", "X"]}))
    with pytest.raises(SetupError, match="names 'WanPipeline', not a generator"):
        generator_spec(str(other))
    liar = tmp_path / "liar"
    liar.mkdir()
    (liar / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "image_encoder": [None, None],
                "transformer": ["diffusers", "FluxTransformer2DModel"],
            }
        )
    )
    with pytest.raises(SetupError, match="component 'transformer'"):
        generator_spec(str(liar))
    (liar / "transformer").mkdir()
    assert generator_spec(str(liar)) == (GENERATORS["flux"], str(liar))
    (liar / "model_index.json").write_text("[1, 2]")
    with pytest.raises(SetupError, match="not readable"):
        generator_spec(str(liar))


def test_generate_help_lists_the_ten_with_their_defaults():
    r = subprocess.run([sys.executable, "-m", "pidray.cli", "generate", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env={"COLUMNS": "400", "PATH": ""})  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in NAMES:
        assert f"{name} (1024x1024, {GENERATORS[name].steps} steps" in r.stdout
    assert "--stop-at" in r.stdout and "--generator-offload" in r.stdout


# ------------------------------------------------------------------ packed latents against the diffusers classes
diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")


def _run(name, spec_name, stop_at=None, steps=3, hw=(64, 48)):
    """Our extraction (generator_latent) and, with the same seed, the pipeline's raw output and its per-step
    latents as a callback of the test's own sees them."""
    from tiny_generators import TINY, embeds

    from pipeline.stages.ldm import generator_latent

    pipe = TINY[name]()
    pipe.set_progress_bar_config(disable=True)
    spec = GENERATORS[spec_name]
    call = {**embeds(name.split("-")[0]), "guidance_scale": 3.5}
    if name == "qwenimage":
        call = {**call, "true_cfg_scale": 1.0}
    ours, sigma = generator_latent(pipe, spec, hw, steps, stop_at, generator=torch.Generator().manual_seed(0), **call)
    seen = {}

    def keep(p, i, t, kw):
        seen[i] = (kw["latents"].clone(), float(p.scheduler.sigmas[i + 1]))
        return kw

    out = pipe(height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent", callback_on_step_end=keep,
               generator=torch.Generator().manual_seed(0), **call).images  # fmt: skip
    return pipe, ours, sigma, out, seen


def test_flux_packed_latent_unpacks_as_flux_pipeline_does():
    pipe, ours, sigma, out, _ = _run("flux", "flux")
    ref = diffusers.FluxPipeline._unpack_latents(out, 64, 48, pipe.vae_scale_factor)[0]
    assert sigma is None and ours.shape == (16, 8, 6)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_qwenimage_packed_latent_unpacks_with_its_time_axis_dropped():
    pipe, ours, _, out, _ = _run("qwenimage", "qwenimage")
    ref = diffusers.QwenImagePipeline._unpack_latents(out, 64, 48, pipe.vae_scale_factor)
    assert ref.shape == (1, 16, 1, 8, 6)
    np.testing.assert_array_equal(ours, ref[0, :, 0].numpy())


def test_flux2_token_sequence_lays_out_by_its_position_ids():
    _, ours, _, out, _ = _run("flux2", "flux2")
    ids = diffusers.Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 1, 4, 3))
    ref = diffusers.Flux2Pipeline._unpack_latents_with_ids(out, ids)[0]
    assert ours.shape == (128, 4, 3)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_flux2_klein_raw_latent_is_patchified_and_batch_norm_normalised():
    """Klein's output_type="latent" is the raw 32-channel latent: ours is the normalised 128-channel latent its loop
    held at its last step (what Flux2's own output is), and un-normalised and unpatchified it is klein's output."""
    pipe, ours, _, out, seen = _run("flux2-klein", "flux2-klein-4b")
    assert out.shape == (1, 32, 8, 6) and ours.shape == (128, 4, 3)
    ids = diffusers.Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, 4, 3))
    held = diffusers.Flux2KleinPipeline._unpack_latents_with_ids(seen[2][0], ids)[0]
    np.testing.assert_allclose(ours, held.numpy(), rtol=1e-4, atol=1e-5)
    bn = pipe.vae.bn
    back = torch.from_numpy(ours)[None] * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    back = diffusers.Flux2KleinPipeline._unpatchify_latents(back + bn.running_mean.view(1, -1, 1, 1))
    np.testing.assert_allclose(back.numpy(), out.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,spec", [("flux", "flux"), ("flux2-klein", "flux2-klein-9b"), ("qwenimage", "qwenimage-2512")]
)
def test_stop_at_hands_on_the_x_t_the_loop_held_after_k_steps(name, spec):
    """--stop-at K: the loop's latent after K steps (as a callback sees it), unpacked, at the scheduler's sigma K."""
    from pipeline.latents import Packing, unpack

    _, ours, sigma, _, seen = _run(name, spec, stop_at=1)
    held, sigma_k = seen[0]
    assert sigma == pytest.approx(sigma_k) and 0 < sigma < 1
    fmt = GENERATORS[spec].step_format
    np.testing.assert_array_equal(ours, unpack(held[0].float().numpy(), Packing(fmt, image_hw=(64, 48))))


def test_the_generator_is_a_setting_resume_compares():
    """Another generator's latents are other images, whatever the PiD preset: --resume's settings name it."""
    from jobs.config import JobConfig
    from jobs.settings import SHAPING, output_settings
    from pipeline.runtime import ModelOptions

    def settings(ldm):
        cfg = JobConfig(src="p.txt", dst="out", model=ModelOptions("flux-2kto4k-v1.5"), workflow="ldm", ldm=ldm)
        return output_settings(cfg)

    assert "generator" in SHAPING
    assert settings("zimage-turbo")["generator"] == "zimage-turbo"
    assert settings("zimage-turbo") != settings("flux")


@pytest.mark.parametrize("name,size,ok", [("flux", (1024, 1040), True), ("flux", (1024, 1032), False),
                                          ("sdxl", (1024, 1032), True), ("sdxl", (1024, 1036), False)])  # fmt: skip
def test_a_size_the_generator_cannot_make_is_refused_with_its_multiple(name, size, ok):
    from pipeline.errors import BadParameter
    from pipeline.generate_options import GenerateOptions
    from pipeline.model.presets import get_preset

    spec = GENERATORS[name]
    o = GenerateOptions(size=size)
    if ok:
        assert o.resolved(get_preset(spec.preset), spec.defaults()).size == size
    else:
        with pytest.raises(BadParameter, match=f"multiples of {spec.multiple} \\(the sides {name} makes\\)"):
            o.resolved(get_preset(spec.preset), spec.defaults())


def test_name_equals_folder_gives_the_folder_that_names_settings(tmp_path):
    """A Z-Image-Turbo folder is a ZImagePipeline like Z-Image's: `zimage-turbo=DIR` runs it with turbo's 9 unguided
    steps; a NAME whose class the folder does not hold is one line."""
    import json

    from pipeline.errors import SetupError
    from pipeline.generators import generator_spec

    d = tmp_path / "turbo"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    assert generator_spec(str(d))[0].name == "zimage"
    spec, where = generator_spec(f"zimage-turbo={d}")
    assert (spec.name, spec.steps, spec.guidance, where) == ("zimage-turbo", 9, 0.0, str(d))
    with pytest.raises(SetupError, match="holds a ZImagePipeline, not flux's FluxPipeline"):
        generator_spec(f"flux={d}")
