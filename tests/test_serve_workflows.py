"""/v1/decode and /v1/generate over real HTTP (issue 14): one Serve app with a Flux-layout PiD stand-in (a preset
file, so the replicas load it too) and a tiny PixelDiT + Gemma beside it. Marked slow."""

import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save as st_save

from pipeline.graph import StageGraph
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions

from conftest import endpoint_stand_ins, free_port, wait_healthy

pytestmark = pytest.mark.slow
OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, golden_dir):
    import ray
    from ray import serve

    from serve.run import start

    pid, t2i, gemma = endpoint_stand_ins(tmp_path_factory.mktemp("wf"), golden_dir)
    args = {"preset": pid.preset, "weights": pid.weights, "options": {"overlap": 1},
            "generate": {"preset": str(t2i), "text_encoder": str(gemma)}, "max_cost_mpx_steps": 4}  # fmt: skip
    url = start(args, port=free_port(), num_cpus=2)
    wait_healthy(url, 240)
    yield {"url": url, "pid": pid, "t2i": str(t2i), "gemma": str(gemma)}
    serve.shutdown()
    ray.shutdown()


def _latent(*shape, seed=0, **meta) -> bytes:
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return st_save({"z": z}, metadata=meta or None)


def _px(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_decode_round_trip_equals_the_local_graph(app):
    """A latent posted raw decodes to the image the local decode graph makes of it (same seed), at latent × 32."""
    data = _latent(16, 4, 3, seed=1)
    r = requests.post(app["url"] + "/v1/decode?seed=5", data=data, headers=OCTET, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["X-Pidray-Size"] == "96x128" and r.headers["content-type"] == "image/png"
    local = StageGraph(ModelOptions(app["pid"].preset, weights=app["pid"].weights), UpscaleOptions(seed=5, overlap=1),
                       workflow="decode")  # fmt: skip
    (row,) = local.run_local([{"key": "z.safetensors", "bytes": data}])
    assert np.array_equal(_px(r.content), _px(row["output"]))
    files = {"latent": ("z.npy", _npy(np.zeros((16, 2, 2), np.float32)))}  # multipart, .npy
    r = requests.post(app["url"] + "/v1/decode", files=files, data={"size": "96x64"}, timeout=120)
    assert r.status_code == 200 and r.headers["X-Pidray-Size"] == "96x64", r.text


def _npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


@pytest.mark.parametrize(
    "body,query,status,message",
    [(None, "", 400, "NaN or Inf"), (_latent(8, 4, 3), "", 400, "8 channels"),
     (_latent(16, 4), "", 400, "must be \\[C, h, w\\]"), (_npy(np.zeros((2, 16, 2, 2), np.float32)), "", 400,
     "without ids"), (_latent(16, 4, 3), "?size=4096x4096", 413, "Mpx"), (b"GIF89a not a latent", "", 400,
     "not a latent file"), (_latent(16, 4, 3), "?latent_format=sdxl", 400, "does not fit"),
     (_latent(16, 4, 3), "?latent_format=bogus", 422, "unknown latent format"),
     (_latent(16, 4, 3), "?sigma=-1", 422, "sigma"), (_latent(16, 4, 3), "?size=97x64", 422, "multiples")],
)  # fmt: skip
def test_bad_latents_get_4xx_with_a_message(app, body, query, status, message):
    import re

    if body is None:
        z = torch.zeros(16, 4, 3)
        z[0, 0, 0] = float("nan")
        body = st_save({"z": z})
    r = requests.post(app["url"] + "/v1/decode" + query, data=body, headers=OCTET, timeout=120)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["error"]) and "Traceback" not in r.text
    assert requests.get(app["url"] + "/healthz", timeout=10).status_code == 200


def test_generate_seed_cfg_size_and_upscale(app):
    """/v1/generate: the preset's size, a seed reproduces, CFG off differs, a size of its own, and upscale=true is
    the generated image through the served PiD preset (4x); the same image the CLI's graph makes."""
    post = lambda **b: requests.post(app["url"] + "/v1/generate", json=b, timeout=120)  # noqa: E731
    a, b, c = (
        post(prompt="a cat sleeping", seed=3),
        post(prompt="a cat sleeping", seed=3),
        post(prompt="a cat sleeping", seed=3, cfg_scale=1.0),
    )
    assert a.status_code == b.status_code == c.status_code == 200, a.text
    assert a.headers["X-Pidray-Size"] == "48x32" and a.content == b.content and a.content != c.content
    local = StageGraph(ModelOptions(app["t2i"], text_encoder=app["gemma"]), UpscaleOptions(), "generate")
    (row,) = local.run_local([{"key": "p", "prompt": "a cat sleeping", "seed": 3}])
    assert np.array_equal(_px(a.content), _px(row["output"]))
    d = post(prompt="a red dog", seed=1, size="32x16")
    assert d.status_code == 200 and d.headers["X-Pidray-Size"] == "32x16"
    up = post(prompt="a cat sleeping", seed=3, upscale=True)
    assert up.status_code == 200 and up.headers["X-Pidray-Size"] == "192x128", up.text


@pytest.mark.parametrize(
    "body,ctype,status,message",
    [(b"{not json", "application/json", 400, "not JSON"), (b'{"prompt": ""}', "application/json", 422, "prompt"),
     (b'{"prompt": "a cat", "size": "33x32"}', "application/json", 422, "multiples of the patch size"),
     (b'{"prompt": "a cat", "steps": 1000}', "application/json", 422, "steps"),
     (b'{"prompt": "a cat", "size": "8192x64"}', "application/json", 422, "between 16 and"),
     (b'{"prompt": "a cat", "size": "1024x1024"}', "application/json", 413, "Mpx"),
     (b'{"prompt": "a cat", "colour": 1}', "application/json", 422, "unknown field"),
     (b'{"prompt": "a cat", "upscale": "yes"}', "application/json", 422, "upscale"),
     (b'{"prompt": "a cat", "timeout": [1]}', "application/json", 422, "timeout"),
     (b'["a cat"]', "application/json", 400, "JSON object"), (b"a cat", "text/plain", 415, "application/json")],
)  # fmt: skip
def test_bad_generate_requests_get_4xx(app, body, ctype, status, message):
    r = requests.post(app["url"] + "/v1/generate", data=body, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "Traceback" not in r.text


def test_models_lists_every_workflow(app):
    m = requests.get(app["url"] + "/v1/models", timeout=10).json()
    assert m["served"] == "tiny-flux-2k" and json.dumps(m)


def test_an_upscale_latent_goes_from_encode_to_diffuse_without_the_ingress(app):
    """With a VAE preset the encode stage is a deployment of its own: the ingress hands its response to the diffuse
    deployment unawaited, so the latent never comes back through the ingress — of the two deployments, only the
    diffuse one's result (the pixels) is ever received there."""
    from ray import serve

    ingress = serve.get_deployment_handle("ingress", app_name="pidray")
    before = ingress.received.remote().result(timeout_s=30)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    r = requests.post(app["url"] + "/v1/upscale", data=buf.getvalue(), headers={"Content-Type": "image/png"},
                      timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    assert "encode=" in r.headers["X-Pidray-Timings"] and "diffuse=" in r.headers["X-Pidray-Timings"]
    after = ingress.received.remote().result(timeout_s=30)
    assert after.get("diffuse", 0) == before.get("diffuse", 0) + 1, (before, after)
    assert after.get("encode", 0) == 0, after  # the encode deployment's latent never reached the ingress
