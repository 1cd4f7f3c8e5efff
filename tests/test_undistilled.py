"""The undistilled v1.5 presets: guided DPM-Solver++ through the stage graph, the CLI, Ray Data and the endpoint.

The released weights need gigabytes; the stand-ins are the presets in miniature (random tiny networks of the same
layout, tiny encoders of the library classes: tests/test_encoders.py), one with a tiny Gemma so the guidance has a
caption to act on. The parity of the sampler itself with the official one is the `pid_teacher` golden fixture.
"""

import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_encoders import build_stand_in

from pipeline.errors import BadParameter, Cancelled
from pipeline.graph import StageGraph
from pipeline.model.presets import PRESETS, get_preset
from pipeline.options import Resolved
from pipeline.runtime import ModelOptions
from pipeline.stages import DiffuseStage, UpscaleOptions
from pipeline.tiling import TilePlan

from conftest import make_tiny_gemma, png_bytes

UNDISTILLED = sorted(n for n, p in PRESETS.items() if p.sampler == "guided")


def _photo(hw=(20, 12), seed=0) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8)))


def test_the_three_undistilled_presets_are_the_v15_teachers():
    assert UNDISTILLED == ["flux-2kto4k-v1.5-undistilled", "flux2-2kto4k-v1.5-undistilled",
                           "qwenimage-2kto4k-v1.5-undistilled"]  # fmt: skip
    for name in UNDISTILLED:
        p, twin = get_preset(name), get_preset(name.removesuffix("-undistilled"))
        assert p.config == twin.config and p.vae == twin.vae and p.vae_checkpoint == twin.vae_checkpoint
        assert p.checkpoint.endswith("_undistilled/model_ema_bf16.pth") and "distill_4step" not in p.checkpoint
        assert p.default_steps == 25 and p.guidance["cfg_scale"] == 5.0 and p.guidance["shift"] is None
        assert p.guidance["negative_prompt"] == get_preset("pixeldit-2k").t2i["negative_prompt"]


def _resolved(preset, **opts) -> Resolved:
    return Resolved.of(UpscaleOptions(**opts), preset)  # as a row entering a workflow of this preset resolves them


def test_options_are_checked_against_the_preset_sampler():
    teacher, student = get_preset("flux-2kto4k-v1.5-undistilled"), get_preset("flux-2kto4k-v1.5")
    assert _resolved(teacher).steps == 25 and _resolved(teacher, steps=60).steps == 60
    with pytest.raises(BadParameter, match="steps must be in 1..4 for the distilled preset"):
        _resolved(student, steps=25)
    with pytest.raises(BadParameter, match="cfg_scale and shift apply to the undistilled presets"):
        _resolved(student, cfg_scale=5.0, shift=3.0)
    for bad in ({"cfg_scale": float("inf")}, {"cfg_scale": "5"}, {"shift": 0.0}, {"shift": True}, {"steps": 201},
                {"steps": True}):  # fmt: skip
        with pytest.raises(BadParameter):
            UpscaleOptions(**bad)
    # the official dynamic shift: 6 at 2048², 6·sqrt(2) at 4096², unless given
    guidance = teacher.sampling.guidance
    assert _resolved(teacher).shift is None  # dynamic: the output's size decides it
    assert guidance(_resolved(teacher), (2048, 2048)).shift == pytest.approx(6.0)
    assert guidance(_resolved(teacher), (4096, 4096)).shift == pytest.approx(6.0 * 2**0.5)
    g = guidance(_resolved(teacher, shift=3.0, cfg_scale=2.0, steps=7), (4096, 4096))
    assert (g.steps, g.cfg_scale, g.shift) == (7, 2.0, 3.0)
    # cost: two forwards a step with guidance, one without
    assert teacher.sampling.work_factor(_resolved(teacher), (64, 64)) == 2.0
    assert teacher.sampling.work_factor(_resolved(teacher, cfg_scale=1.0), (64, 64)) == 1.0
    assert student.sampling.work_factor(_resolved(student), (64, 64)) == 1.0


def _teacher_stage(golden_dir, **opts):
    from pipeline.model.config import PidConfig
    from pipeline.model.loading import load_network, network_tensors, read_state_dict

    tensors, meta = read_state_dict(golden_dir / "pid_v1pt5_teacher_flux.safetensors")
    net = load_network(PidConfig.from_official(json.loads(meta["config"])), network_tensors(tensors))
    preset = dataclasses.replace(get_preset("flux-2kto4k-v1.5-undistilled"), config=net.cfg, envelope=(128, 128))
    return tensors, net, DiffuseStage(options=UpscaleOptions(**opts), loaded=(preset, net))


def test_one_tile_path_equals_the_guided_sampler(golden_dir):
    """An image that is one tile: the stage gives exactly what the (golden-verified) guided sampler gives for the
    official recipe — degrade noise and initial noise each from a generator seeded with the seed, the null caption
    with the same LQ latent and sigma, the dynamic shift of the output size."""
    from pipeline.model.guided import Guidance, dynamic_shift, guided_sample
    from pipeline.model.sampler import degrade_latent

    tensors, net, stage = _teacher_stage(golden_dir, steps=3, seed=42)
    lat, y, y_null = tensors["input.lq_latent"][0], tensors["input.y"][0], tensors["input.y_null"][0]
    sigma = float(tensors["input.degrade_sigma"][0])
    plan = TilePlan((32, 24), 8, 32, 4, (4, 3), (4, 3), (1, 1))
    got = stage.diffuse(lat, y, plan, seed=42, sigma=sigma, y_null=y_null)
    eps = torch.randn((1, *lat.shape), generator=torch.Generator().manual_seed(42))
    feats = net.encode_lq((128, 96), latent=degrade_latent(lat[None], sigma, eps))
    s = torch.tensor([sigma])
    noise = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(42))
    with torch.inference_mode():
        ref = guided_sample(lambda x, t: net(x, t, y[None], feats, s), lambda x, t: net(x, t, y_null[None], feats, s),
                            noise, Guidance(3, 5.0, dynamic_shift(128, 96)))  # fmt: skip
    assert torch.equal(got, ref[0])
    with pytest.raises(ValueError, match="null caption"):
        stage.diffuse(lat, y, plan, seed=42, sigma=sigma)


def test_cancelled_between_solver_steps(golden_dir):
    """A request that goes away stops between solver steps: after the first step's two forwards, no more."""
    tensors, net, stage = _teacher_stage(golden_dir, steps=5, seed=1)
    calls = []
    forward = net.forward
    net.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    lat, y = tensors["input.lq_latent"][0], tensors["input.y"][0]
    plan = TilePlan((32, 24), 8, 32, 4, (4, 3), (4, 3), (1, 1))
    from pipeline.stages.diffuse import DiffuseItem

    item = DiffuseItem(lat, y, plan, 1, 0.0, 5, guidance=stage.preset.sampling.guidance(stage.options, plan.out_hw),
                       y_null=tensors["input.y_null"][0])  # fmt: skip
    with pytest.raises(Cancelled):
        stage.diffuse_many([item], steps=5, should_stop=lambda: len(calls) >= 2)
    assert len(calls) == 2  # cond + uncond of step 1; 10 forwards had it run to the end


def test_tiled_guided_sampling_matches_untiled():
    """Tiles share noise and blend their x0 estimates every solver step: tiled ≈ untiled (≥ 40 dB), shown on the
    bundled model (a network whose output is local, as the distilled path's seam test uses) sampled by the guided
    solver for 3 steps."""
    from test_stages import _lq_photo_bytes

    from pipeline.model.presets import GUIDED_DEFAULTS

    name = "small-guided"
    PRESETS[name] = dataclasses.replace(get_preset("small"), name=name, sampler="guided", default_steps=3,
                                        guidance=dict(GUIDED_DEFAULTS))  # fmt: skip
    try:
        data, outs = _lq_photo_bytes(256), {}
        for tile in (1024, 128):
            row = next(
                StageGraph(ModelOptions(name), UpscaleOptions(tile=tile, seed=3)).run_local(
                    [{"key": "a", "bytes": data}]
                )
            )
            assert row["status"] == "ok", row.get("error")
            outs[TilePlan.from_dict(row["plan"]).n_tiles] = np.asarray(Image.open(io.BytesIO(row["output"]))).astype(
                np.float64
            )
    finally:
        PRESETS.pop(name)
    assert sorted(outs) == [1, 9]
    psnr = 10 * np.log10(255**2 / np.mean((outs[1] - outs[9]) ** 2))
    print(f"guided sampler, 3 steps: tiled (9 tiles) vs untiled PSNR {psnr:.2f} dB")
    assert psnr >= 40.0


def guided_stand_in(name, golden_dir, root, gemma=None):
    """`build_stand_in` of an undistilled preset; with `gemma` (a tiny Gemma folder), its caption width and the Gemma
    caption encoder, so the caption and the null caption differ and the guidance acts."""
    from pipeline.model.loading import to_official
    from pipeline.model.network import PidNet

    preset = build_stand_in(name, golden_dir, root)
    if gemma is not None:
        cfg = dataclasses.replace(preset.config, txt_embed_dim=16)
        preset = dataclasses.replace(preset, config=cfg, text_encoder="gemma-2-2b-it")
        torch.manual_seed(0)
        net = PidNet(cfg)
        torch.save({f"net.{to_official(k)}": v for k, v in net.state_dict().items()}, root / preset.checkpoint)
        (root / "preset.json").write_text(json.dumps(preset.describe()))
    return preset


@pytest.mark.parametrize("name", UNDISTILLED)
def test_stand_ins_upscale_images_and_decode_latents(name, golden_dir, tmp_path):
    """Each undistilled preset: an image of one tile and a tiled one, and a latent, through the stage graph; exactly
    4x; same seed, same bytes."""
    preset = guided_stand_in(name, golden_dir, tmp_path)
    PRESETS[preset.name] = preset
    try:
        model = ModelOptions(preset.name, weights=str(tmp_path))
        graph = StageGraph(model, UpscaleOptions(overlap=1, degrade_sigma=0.3, seed=11, steps=2))
        for hw in ((20, 12), (37, 50)):
            rows = list(graph.run_local([{"key": "a", "bytes": _photo(hw)}, {"key": "b", "bytes": _photo(hw)}]))
            assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
            assert Image.open(io.BytesIO(rows[0]["output"])).size == (hw[1] * 4, hw[0] * 4)
            assert rows[0]["output"] == rows[1]["output"]
            assert (TilePlan.from_dict(rows[0]["plan"]).n_tiles > 1) == (hw == (37, 50))
        from safetensors.torch import save as st_save

        lat = torch.randn(preset.latent_channels, 3, 2, generator=torch.Generator().manual_seed(1))
        file = st_save({"latent": lat})
        dec = StageGraph(model, UpscaleOptions(overlap=1, steps=2), workflow="decode")
        rows = list(dec.run_local([{"key": "z.safetensors", "bytes": file}, {"key": "y.safetensors", "bytes": file}]))
        assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
        assert rows[0]["output"] == rows[1]["output"]
    finally:
        PRESETS.pop(preset.name)


def test_guidance_acts_with_a_caption_encoder(golden_dir, tmp_path):
    """With a (tiny, real-class) Gemma the caption and the null caption differ: the guidance scale changes the image,
    a given shift changes it, and the defaults equal their explicit values."""
    gemma = make_tiny_gemma(tmp_path / "gemma")
    preset = guided_stand_in("flux-2kto4k-v1.5-undistilled", golden_dir, tmp_path / "flux", gemma)
    PRESETS[preset.name] = preset
    try:
        model = ModelOptions(preset.name, weights=str(tmp_path / "flux"), text_encoder=str(gemma))

        def run(**o):
            g = StageGraph(model, UpscaleOptions(overlap=1, seed=2, steps=2, caption="a red dog", **o))
            row = next(g.run_local([{"key": "a", "bytes": _photo()}]))
            assert row["status"] == "ok", row.get("error")
            return np.asarray(Image.open(io.BytesIO(row["output"]))).astype(np.float64)

        default, five, one, shifted, strong = (
            run(),
            run(cfg_scale=5.0),
            run(cfg_scale=1.0),
            run(shift=3.0),
            run(cfg_scale=20.0),
        )
        assert np.array_equal(default, five)
        assert not np.array_equal(default, one) and not np.array_equal(default, shifted)
        assert np.abs(strong - one).mean() > np.abs(five - one).mean() > 0  # further from unguided as the scale grows
    finally:
        PRESETS.pop(preset.name)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pidray.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_cli_runs_an_undistilled_stand_in_and_refuses_guidance_on_a_distilled_one(golden_dir, tmp_path):
    guided_stand_in("qwenimage-2kto4k-v1.5-undistilled", golden_dir, tmp_path / "q")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_photo((12, 8)))
    preset, weights = tmp_path / "q" / "preset.json", tmp_path / "q"
    out = _cli("upscale", tmp_path / "in", tmp_path / "out", "-m", preset, "--weights", weights, "--steps", 2,
               "--cfg-scale", 3, "--shift", 2.5, "--overlap", 1, "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "out" / "a.png").size == (32, 48)
    for flags, message in (
        (["-m", "small", "--cfg-scale", "3"], "cfg_scale apply to the undistilled presets"),
        (["-m", "small", "--steps", "9"], "steps must be in 1..4 for the distilled preset small"),
        (["-m", preset, "--weights", weights, "--shift", "1e400"], "shift must be in"),
    ):
        out = _cli("upscale", tmp_path / "in", tmp_path / "never", *flags)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out
        assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_ray_data_job_equals_the_local_loop(golden_dir, tmp_path):
    """A bulk job of an undistilled stand-in on Ray Data (its actors load the preset file), one image of one tile and
    one tiled: the same bytes as the in-process loop."""
    import ray

    from jobs.pipeline import JobConfig, run_job

    guided_stand_in("flux2-2kto4k-v1.5-undistilled", golden_dir, tmp_path / "f2")
    model = ModelOptions(str(tmp_path / "f2" / "preset.json"), weights=str(tmp_path / "f2"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.png").write_bytes(_photo((20, 12)))
    (tmp_path / "in" / "tiled.png").write_bytes(_photo((37, 50), seed=1))
    opts = UpscaleOptions(overlap=1, steps=2, seed=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        far = run_job(JobConfig(str(tmp_path / "in"), str(tmp_path / "ray"), model, opts, progress=False, local=False))
    finally:
        ray.shutdown()
    near = run_job(JobConfig(str(tmp_path / "in"), str(tmp_path / "loc"), model, opts, progress=False, local=True))
    assert far.runner == "Ray Data" and far.ok == near.ok == 2
    for name in ("one.png", "tiled.png"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "loc" / name).read_bytes()


@pytest.mark.slow
def test_endpoint_serves_an_undistilled_stand_in(golden_dir, tmp_path):
    """/v1/upscale and /v1/decode with an undistilled stand-in over real HTTP: the local graph's bytes, the guidance
    parameters taken and checked (422), and the work bound counting two forwards a step (413 from the header)."""
    import ray
    import requests
    from ray import serve
    from safetensors.torch import save as st_save

    from serve.run import start

    from conftest import free_port, wait_healthy

    guided_stand_in("flux-2kto4k-v1.5-undistilled", golden_dir, tmp_path / "f")
    model = ModelOptions(str(tmp_path / "f" / "preset.json"), weights=str(tmp_path / "f"))
    # a work bound of 2.2 Mpx·steps: a 48x80 output at 2 steps costs 0.015 (3840 px x 2 steps x 2 forwards); a 240²
    # output (tiles of the stand-in's 128² envelope) at 150 steps costs over 10
    url = start({"preset": model.preset, "weights": model.weights, "options": {"overlap": 1},
                 "max_cost_mpx_steps": 2.2}, port=free_port(), num_cpus=2)  # fmt: skip
    try:
        wait_healthy(url, 240)
        raw = {"Content-Type": "image/png"}
        r = requests.post(f"{url}/v1/upscale?steps=2&seed=9&cfg_scale=3&shift=2", data=_photo(), headers=raw,
                          timeout=300)  # fmt: skip
        assert r.status_code == 200, r.text
        opts = UpscaleOptions(overlap=1, steps=2, seed=9, cfg_scale=3.0, shift=2.0)
        local = next(StageGraph(model, opts).run_local([{"key": "request.png", "bytes": _photo()}]))
        assert r.content == local["output"]
        lat = st_save({"z": torch.randn(16, 3, 2, generator=torch.Generator().manual_seed(0))})
        r = requests.post(f"{url}/v1/decode?steps=2", data=lat, headers={"Content-Type": "application/octet-stream"},
                          timeout=300)  # fmt: skip
        assert r.status_code == 200 and r.headers["X-Pidray-Size"] == "64x96", r.text
        for query, status, message in (
            ("cfg_scale=abc", 422, "cfg_scale must be float"),
            ("cfg_scale=1e400", 422, "cfg_scale must be in"),
            ("steps=0", 422, "steps must be an integer in 1..200"),
            ("steps=150", 413, "x 2.00 passes"),
        ):
            r = requests.post(f"{url}/v1/upscale?{query}", data=_photo((60, 60)), headers=raw, timeout=60)
            assert r.status_code == status and message in r.json()["error"], (query, r.status_code, r.text)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("bad", [{"guidance": {"cfg_scale": "x"}}, {"guidance": {"cfg_scale": float("inf")}},
                                 {"guidance": {"foo": 1}}, {"guidance": {"shift": True}}, {"sampler": "teacher"},
                                 {"default_steps": 10**9}, {"guidance": {"negative_prompt": 3}}])  # fmt: skip
def test_a_preset_file_with_bad_guidance_is_refused(bad):
    from pipeline.model.presets import preset_from_dict

    d = get_preset("flux-2kto4k-v1.5-undistilled").describe()
    d = {**d, **bad, "guidance": {**d["guidance"], **bad.get("guidance", {})}}
    with pytest.raises(ValueError, match="not a valid preset"):
        preset_from_dict(d)
    assert preset_from_dict(get_preset("flux-2kto4k-v1.5-undistilled").describe()) == get_preset(
        "flux-2kto4k-v1.5-undistilled"
    )
