"""Generate-then-decode beyond one process: /v1/generate with `with` over real HTTP (an endpoint started with
generate={"with": a tiny Z-Image diffusers folder}, a Flux-layout PiD stand-in decoding its latents) and a prompt
file through `--ray` (the generator as an actor pool of its own). Both give the image the local graph makes.
Marked slow."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from pipeline.graph import StageGraph
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions

from conftest import ROOT, free_port, make_tiny_zimage, wait_healthy

pytestmark = pytest.mark.slow
pytest.importorskip("diffusers")
GEN = {"steps": 3, "cfg_scale": 0.0, "size": [64, 48]}  # the endpoint's generator defaults (H, W)


@pytest.fixture(scope="module")
def models(tmp_path_factory, golden_dir):
    from test_encoders import build_stand_in

    d = tmp_path_factory.mktemp("with")
    build_stand_in("flux-2k", golden_dir, d / "flux")
    return {"pid": ModelOptions(str(d / "flux" / "preset.json"), weights=str(d / "flux")),
            "zimage": str(make_tiny_zimage(d / "zimage"))}  # fmt: skip


@pytest.fixture(scope="module")
def app(models):
    import ray
    from ray import serve

    from serve.run import start

    pid = models["pid"]
    args = {"preset": pid.preset, "weights": pid.weights, "options": {"overlap": 1}, "max_cost_mpx_steps": 4,
            "generate": {"with": models["zimage"], "options": GEN}}  # fmt: skip
    url = start(args, port=free_port(), num_cpus=2)
    wait_healthy(url, 300)
    yield url
    serve.shutdown()
    ray.shutdown()


def _px(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _local(models, prompt: str, seed: int, **gen) -> np.ndarray:
    g = StageGraph(models["pid"], UpscaleOptions(overlap=1, seed=seed), "ldm", gen={**GEN, **gen}, ldm=models["zimage"])
    (row,) = list(g.run_local([{"key": "p", "prompt": prompt, "seed": seed}]))
    assert row["status"] == "ok", row.get("error")
    return _px(row["output"])


def test_v1_generate_with_the_served_generator_is_the_local_graph_image(app, models):
    """The generator named by its registry name or as the endpoint was started, or not named: the image the local
    ldm graph makes of the same prompt and seed (4x the generator's 48x64); --stop-at's x_t likewise."""
    post = lambda **b: requests.post(app + "/v1/generate", json=b, timeout=300)  # noqa: E731
    r = post(prompt="a cat sleeping", seed=5, **{"with": "zimage"})
    assert r.status_code == 200, r.text
    img = _px(r.content)
    assert img.shape == (256, 192, 3)
    assert np.array_equal(img, _local(models, "a cat sleeping", 5))
    again = post(prompt="a cat sleeping", seed=5, **{"with": models["zimage"]})
    assert again.status_code == 200 and np.array_equal(_px(again.content), img)
    early = post(prompt="a cat sleeping", seed=5, stop_at=2)
    assert early.status_code == 200, early.text
    assert np.array_equal(_px(early.content), _local(models, "a cat sleeping", 5, stop_at=2))
    assert not np.array_equal(_px(early.content), img)


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"prompt": "a cat", "with": "flux"}, 422, "generates with 'zimage', not 'flux'"),
        ({"prompt": "a cat", "stop_at": 4}, 422, "stop_at 4 is past the last of the generator's 3 steps"),
        ({"prompt": "a cat", "stop_at": True}, 422, "stop_at must be an integer"),
        ({"prompt": "a cat", "stop_at": 1e400}, 422, "stop_at must be an integer"),
        ({"prompt": "a cat", "with": {}}, 422, "with must be a string"),
        ({"prompt": "a cat", "size": "40x40"}, 422, "multiples of 16 (the sides zimage makes)"),
        ({"prompt": "a cat", "upscale": True}, 422, "upscale is for a text-to-image preset"),
        ({"prompt": "a cat", "steps": 100, "size": "1024x1024"}, 413, "Mpx·steps of sampling"),
    ],
)
def test_bad_generate_with_requests_get_4xx_with_a_message(app, body, status, message):
    r = requests.post(app + "/v1/generate", data=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=60)  # fmt: skip
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "Traceback" not in r.text


def test_openapi_lists_with_and_stop_at(app):
    spec = requests.get(app + "/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = body["properties"]
    assert props["with"]["type"] == "string" and "generator" in props["with"]["description"]
    assert props["stop_at"] == {"type": "integer", "minimum": 1, "maximum": 200,
                                "description": "hand PiD the generator's x_t after K of its steps, at that step's "
                                "sigma (skips the rest)"}  # fmt: skip
    assert props["steps"]["minimum"] == 2 and props["cfg_scale"]["maximum"] == 50


def test_prompt_file_through_ray_is_the_local_jobs_images(models, tmp_path):
    """`pidray generate --with DIR --prompts FILE DST --ray`: the generator runs as an actor pool of its own, each
    prompt's image equals the --local job's; a line asking for a size the generator cannot make
    fails alone with its reason."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "a cat sleeping", "seed": 5, "name": "cat"},
        {"prompt": "a red fox", "seed": 6, "name": "fox", "size": "48x32"},
        {"prompt": "a bad size", "seed": 7, "name": "odd", "size": "40x40"},
    ]) + "\n")  # fmt: skip
    pid = models["pid"]
    outs = {}
    for mode in ("--local", "--ray"):
        dst = tmp_path / mode.strip("-")
        args = ["generate", "--with", models["zimage"], "--prompts", str(prompts), str(dst), "-m", pid.preset,
                "--weights", pid.weights, "--steps", "2", "--size", "48x64", "--cfg-scale", "0", "--no-progress",
                mode]  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "pidray.cli", *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=900)  # fmt: skip
        assert r.returncode == 3, r.stdout + r.stderr  # one line failed (rows_failed), the others done
        assert "multiples of 16 (the sides zimage makes)" in r.stdout + r.stderr
        outs[mode] = {p.name: _px(p.read_bytes()) for p in dst.glob("*.png")}
        assert sorted(outs[mode]) == ["cat.png", "fox.png"]
    assert outs["--ray"]["cat.png"].shape == (256, 192, 3) and outs["--ray"]["fox.png"].shape == (128, 192, 3)
    for name in ("cat.png", "fox.png"):
        assert np.array_equal(outs["--ray"][name], outs["--local"][name])
