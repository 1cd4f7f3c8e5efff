"""Generate-then-decode for each of the ten registered generators, a plain prompt in: a tiny random pipeline of the
registered diffusers class, with its tiny text encoders and word-level tokenizers, saved as a diffusers folder and run
by the ldm workflow (LDMStage: the record's own call arguments) into a PiD stand-in of the record's preset. The image
it hands over is exactly `pidray decode` of the latent the pipeline itself returns with `output_type="latent"` (laid
out by the class's own static helpers, not by ours); with `stop_at` K it is exactly `pidray decode --sigma σ_K` of the
x_t a callback of the test's own saw after K steps."""

import io

import numpy as np
import pytest
from PIL import Image
from test_encoders import stand_in  # noqa: F401

from pipeline.generators import GENERATORS, generator_spec
from pipeline.graph import StageGraph
from pipeline.model.presets import get_preset
from pipeline.stages import UpscaleOptions

from conftest import make_tiny_zimage

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

NAMES = list(GENERATORS)
SLOW = {"flux", "flux2", "zimage", "zimage-turbo", "sdxl"}  # over ~10 s a test on 2 busy cores (512 tokens, CFG)
CASES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES]
PROMPT, SEED, HW, STEPS = "a red cat sleeping on the warm windowsill", 5, (48, 32), 3
CHANNELS = {"flux1": 16, "flux2": 32, "qwenimage": 16, "sd3": 16, "sdxl": 4}  # the stand-ins' latent channels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tiny(class name)`: (its diffusers folder, the pipeline loaded from it), built once for the module."""
    from tiny_generators import PROMPTED

    made = {}

    def get(cls: str):
        if cls not in made:
            d = tmp_path_factory.mktemp(cls)
            if cls == "ZImagePipeline":
                make_tiny_zimage(d)
            else:
                PROMPTED[cls]().save_pretrained(str(d), safe_serialization=True)
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(d))
            pipe.set_progress_bar_config(disable=True)
            made[cls] = (d, pipe)
        return made[cls]

    return get


def _px(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _as_pid(cls: str, lat: torch.Tensor, pipe) -> torch.Tensor:
    """A latent as the pipeline holds or returns it ([1, ...]) -> the [C, h, w] PiD's LQ encoder produces, by the
    class's own static helpers: unpacked (Flux, Qwen-Image: its one-frame time axis dropped), laid out by its
    position ids (FLUX.2's token sequences)."""
    h, w = HW
    if cls == "FluxPipeline":
        return diffusers.FluxPipeline._unpack_latents(lat, h, w, pipe.vae_scale_factor)[0]
    if cls == "QwenImagePipeline":
        return diffusers.QwenImagePipeline._unpack_latents(lat, h, w, pipe.vae_scale_factor)[0, :, 0]
    if cls in ("Flux2Pipeline", "Flux2KleinPipeline"):  # [1, tokens, C]
        ids = type(pipe)._prepare_latent_ids(torch.zeros(1, 1, h // 16, w // 16))
        return type(pipe)._unpack_latents_with_ids(lat, ids)[0]
    return lat[0]


def _klein_raw(pipe, z: torch.Tensor) -> torch.Tensor:
    """FLUX.2-klein's own last move before it returns: its loop's patchified [4C, h, w] latent un-normalised with the
    VAE's batch-norm statistics and unpatchified into the raw [1, C, 2h, 2w] (what output_type="latent" gives)."""
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return diffusers.Flux2KleinPipeline._unpatchify_latents(z[None] * std + bn.running_mean.view(1, -1, 1, 1))


def _keeper(held: dict):
    """A step-end callback of the test's own: the loop's latents after each step and the scheduler's sigma there."""

    def keep(p, i, t, kw):
        held.setdefault(i, (kw["latents"].clone(), float(p.scheduler.sigmas[i + 1])))
        return kw

    return keep


def _call(name: str) -> dict:
    """The registry record's own call: its extra arguments, its guidance under the argument --cfg-scale sets."""
    g = GENERATORS[name]
    return {**dict(g.extra), g.cfg_arg: g.guidance}


def _ldm_row(name: str, folder, opts, options, **gen) -> dict:
    g = GENERATORS[name]
    gen = {"steps": STEPS, "cfg_scale": g.guidance, "size": HW, **gen}
    graph = StageGraph(opts, options, "ldm", gen=gen, ldm=str(folder))
    (row,) = list(graph.run_local([{"key": "p", "prompt": PROMPT, "seed": SEED}]))
    assert row["status"] == "ok", row.get("error")
    return row


def _decode(opts, options, lat: torch.Tensor, sigma: float | None = None) -> dict:
    from safetensors.torch import save as st_save

    item = {"key": "z.safetensors", "bytes": st_save({"z": lat.float().contiguous()}), "caption": PROMPT}
    if sigma is not None:
        item["sigma"] = sigma
    (ref,) = list(StageGraph(opts, options, "decode").run_local([item]))
    assert ref["status"] == "ok", ref.get("error")
    return ref


def test_klein_and_2512_resolve_to_the_flux2_and_qwenimage_students():
    assert GENERATORS["flux2-klein-4b"].preset == GENERATORS["flux2-klein-9b"].preset == GENERATORS["flux2"].preset
    assert GENERATORS["qwenimage-2512"].preset == GENERATORS["qwenimage"].preset
    assert GENERATORS["zimage"].preset == GENERATORS["zimage-turbo"].preset == GENERATORS["flux"].preset


@pytest.mark.parametrize("name", CASES)
def test_generate_then_decode_is_the_decode_of_the_latent_the_pipeline_returns(name, tiny, stand_in):  # noqa: F811
    """The ldm workflow (a prompt through the pipeline's own text encoders, the record's call arguments, its
    preset's stand-in) hands PiD exactly the latent the pipeline returns with output_type="latent" for the same
    prompt and seed: the image equals `pidray decode` of that latent. The folder resolves to a record of its class
    with the name's own preset, call arguments and latent formats."""
    g = GENERATORS[name]
    folder, pipe = tiny(g.pipeline)
    spec = generator_spec(str(folder))[0]
    fields = ("pipeline", "latent_format", "step_format", "preset", "extra", "cfg_arg")
    assert [getattr(spec, f) for f in fields] == [getattr(g, f) for f in fields]
    opts, options = stand_in(g.preset), UpscaleOptions(overlap=1, seed=SEED, steps=1)
    row = _ldm_row(name, folder, opts, options)
    assert row["out_hw"] == [HW[0] * 4, HW[1] * 4] and not row.get("noised")
    held = {}
    out = pipe(prompt=PROMPT, height=HW[0], width=HW[1], num_inference_steps=STEPS, output_type="latent",
               generator=torch.Generator().manual_seed(SEED), callback_on_step_end=_keeper(held),
               **_call(name)).images  # fmt: skip
    other = pipe(prompt="a dog in the busy city street", height=HW[0], width=HW[1], num_inference_steps=STEPS,
                 output_type="latent", generator=torch.Generator().manual_seed(SEED), **_call(name)).images  # fmt: skip
    assert not torch.equal(out, other)  # the prompt reaches the transformer through the pipeline's text encoders
    if g.pipeline == "Flux2KleinPipeline":  # it returns its latent un-normalised: PiD gets the one it un-normalised
        lat = _as_pid(g.pipeline, held[STEPS - 1][0], pipe)
        assert out.shape == (1, 8, HW[0] // 8, HW[1] // 8) and torch.equal(_klein_raw(pipe, lat), out)
    else:
        lat = _as_pid(g.pipeline, out, pipe)
    vae = get_preset(g.preset).vae
    down = 16 if vae == "flux2" else 8
    assert tuple(lat.shape) == (CHANNELS[vae], HW[0] // down, HW[1] // down) and lat.abs().sum() > 0
    ref = _decode(opts, options, lat)
    assert np.array_equal(_px(row["output"]), _px(ref["output"]))


@pytest.mark.parametrize("name", CASES)
def test_stop_at_is_the_decode_at_sigma_k_of_the_x_t_held_after_k_steps(name, tiny, stand_in):  # noqa: F811
    """--stop-at K of N: the image equals `pidray decode --sigma σ_K` of the x_t the pipeline's loop held after K
    steps (seen by a step-end callback of the test's own, laid out by the class's helpers; SDXL's Euler x_t moved to
    the VP frame by the decode itself), and the row's notes name K and σ_K."""
    g = GENERATORS[name]
    folder, pipe = tiny(g.pipeline)
    opts, options = stand_in(g.preset), UpscaleOptions(overlap=1, seed=SEED, steps=1)
    row = _ldm_row(name, folder, opts, options, stop_at=2)
    held = {}
    pipe(prompt=PROMPT, height=HW[0], width=HW[1], num_inference_steps=STEPS, output_type="latent",
         generator=torch.Generator().manual_seed(SEED), callback_on_step_end=_keeper(held), **_call(name))  # fmt: skip
    xt, sigma = held[1]
    assert sigma > 0 and (sigma < 1 or g.pipeline == "StableDiffusionXLPipeline")
    assert row["noised"] and row["sigma"] == pytest.approx(sigma)
    assert any(f"after step 2 of {STEPS}, sigma {sigma:.6g}" in n for n in row["notes"])
    ref = _decode(opts, options, _as_pid(g.pipeline, xt, pipe), sigma)
    assert np.array_equal(_px(row["output"]), _px(ref["output"]))
