"""The endpoint: real Ray Serve over HTTP on 127.0.0.1, the same stage classes as the batch job.

Marked slow. One app for the module: the bundled `small` model, a bearer token,
a small ingress queue (capacity 4 running + 4 queued) so that back-pressure is reachable.
"""

import asyncio
import io
import re
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image

import corpus
from conftest import ROOT, free_port, png_bytes

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CAPACITY = 8  # ingress max_ongoing_requests + max_queued_requests below


@pytest.fixture(scope="module")
def s3_out(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="results")
    return s3_server


@pytest.fixture(scope="module")
def endpoint(s3_out):
    import ray
    from ray import serve

    from serve.run import start

    args = {
        "output_s3": {"uri": "s3://results/upscaled", "s3": {"endpoint_url": s3_out, "region": "us-east-1"}},
        "preset": "small", "token": TOKEN, "max_batch_tiles": 8, "batch_wait_s": 0.05,
        "deployments": {"ingress": {"max_ongoing_requests": 4, "max_queued_requests": 4,
                                    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
                                    "ray_actor_options": {"num_cpus": 0.1}}},
    }  # fmt: skip
    url = start(args, port=free_port(), num_cpus=2)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    yield url
    serve.shutdown()
    ray.shutdown()


def _img(h=24, w=32, seed=0):
    return png_bytes(Image.fromarray(corpus._rgb(h, w, seed)))


def test_round_trip_and_determinism(endpoint):
    data = _img(30, 41)
    r1 = requests.post(endpoint + "/v1/upscale?seed=7", data=data, headers=AUTH, timeout=120)
    assert r1.status_code == 200, r1.text
    assert r1.headers["content-type"] == "image/png" and r1.headers["x-pidray-seed"] == "7"
    out = np.asarray(Image.open(io.BytesIO(r1.content)).convert("RGB"), dtype=np.float64)
    assert out.shape == (120, 164, 3)
    ref = np.asarray(Image.open(io.BytesIO(data)).resize((164, 120), Image.BICUBIC), dtype=np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((out - ref) ** 2))
    assert psnr > 25, psnr  # an upscale of this picture, not noise
    r2 = requests.post(endpoint + "/v1/upscale?seed=7", data=data, headers=AUTH, timeout=120)
    assert r2.content == r1.content
    form = {"seed": "7", "format": "jpeg", "quality": "80"}
    files = {"image": ("x.png", data, "image/png")}
    multipart = requests.post(endpoint + "/v1/upscale", files=files, data=form, headers=AUTH, timeout=120)
    assert multipart.status_code == 200 and multipart.headers["content-type"] == "image/jpeg"


def test_large_outputs_can_go_to_s3(endpoint, s3_out):
    import boto3

    r = requests.post(endpoint + "/v1/upscale?store=s3&seed=1", data=_img(20, 30), headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["uri"].startswith("s3://results/upscaled/") and body["size"] == "120x80"
    obj = boto3.client("s3", endpoint_url=s3_out).get_object(Bucket="results", Key=f"upscaled/{body['key']}")
    assert Image.open(io.BytesIO(obj["Body"].read())).size == (120, 80)


def test_models_and_health(endpoint):
    m = requests.get(endpoint + "/v1/models", timeout=10).json()
    assert m["served"] == "small" and m["presets"]["small"]["scale"] == 4 and "flux-2k" in m["presets"]
    assert requests.get(endpoint + "/healthz", timeout=10).json()["status"] == "ok"


def test_auth_required(endpoint):
    assert requests.post(endpoint + "/v1/upscale", data=_img(), timeout=30).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    r = requests.post(endpoint + "/v1/upscale", data=_img(), headers=bad, timeout=30)
    assert r.status_code == 401 and r.json()["error"] == "missing or invalid bearer token"


@pytest.mark.parametrize(
    "query,message",
    [("steps=9", "steps must be an integer in 1..4"), ("seed=abc", "seed must be int"),
     ("degrade_sigma=2", r"degrade_sigma must be in \[0, 1\]"), ("preset=flux-2k", "serves preset 'small'"),
     ("format=gif2", "unknown output format"), ("colour=red", "unknown parameter")],
)  # fmt: skip
def test_bad_parameters_are_422(endpoint, query, message):
    r = requests.post(f"{endpoint}/v1/upscale?{query}", data=_img(), headers=AUTH, timeout=30)
    assert r.status_code == 422 and re.search(message, r.json()["error"]), r.text


def test_bad_input_corpus_gets_4xx_and_replica_stays_healthy(endpoint):
    for key, (data, expect) in corpus.build().items():
        r = requests.post(endpoint + "/v1/upscale", data=data, headers=AUTH, timeout=120)
        if expect[0] == "fail":
            assert r.status_code in (400, 413), (key, r.status_code, r.text)
            assert re.search(expect[1], r.json()["error"]), (key, r.text)
            assert "Traceback" not in r.text
        else:
            assert r.status_code == 200, (key, r.text)
            assert Image.open(io.BytesIO(r.content)).size == expect[1], key
    r = requests.post(endpoint + "/v1/upscale", data=_img(), headers=AUTH, timeout=60)
    assert r.status_code == 200 and requests.get(endpoint + "/healthz", timeout=10).status_code == 200


def test_too_large_body_is_413(endpoint):
    big = b"\x89PNG" + b"\x00" * (51 << 20)
    r = requests.post(endpoint + "/v1/upscale", data=big, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_load_at_twice_capacity_only_200_and_503(endpoint):
    import aiohttp

    data = _img(16, 16)
    statuses, latencies, retry_after = [], [], []

    async def worker(session, stop):
        while time.time() < stop:
            t0 = time.perf_counter()
            async with session.post(endpoint + "/v1/upscale", data=data, headers=AUTH) as r:
                await r.read()
                statuses.append(r.status)
                if r.status == 200:
                    latencies.append(time.perf_counter() - t0)
                elif r.status == 503:
                    retry_after.append(r.headers.get("Retry-After"))
                    await asyncio.sleep(0.2)

    async def main():
        stop = time.time() + 20
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            await asyncio.gather(*(worker(s, stop) for _ in range(2 * CAPACITY)))

    asyncio.run(main())
    latencies.sort()
    codes = {c: statuses.count(c) for c in set(statuses)}
    p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]
    print(f"load: {len(statuses)} requests, statuses {codes}, p50 {p50:.2f}s p99 {p99:.2f}s")
    assert set(codes) <= {200, 503} and codes.get(200, 0) > 0
    assert codes.get(503, 0) > 0 and all(v and int(v) >= 1 for v in retry_after)
    stats = requests.get(endpoint + "/v1/stats", timeout=10).json()
    print("diffuse batch sizes:", stats["batch_sizes"])
    assert any(int(k) > 1 for k in stats["batch_sizes"]), "no request was ever batched"


def test_page_in_headless_chromium(endpoint, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (./dev.sh test installs it)"
    from playwright.sync_api import sync_playwright

    src = tmp_path / "photo.png"
    src.write_bytes(_img(40, 56))
    shot = ROOT / "out" / "test-artifacts" / "serve_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags, headless=True)
        page = browser.new_page()
        page.goto(endpoint + "/")
        page.wait_for_function("document.querySelectorAll('#preset option').length > 0")
        page.fill("#token", TOKEN)
        page.set_input_files("#file", str(src))
        page.click("#go")
        page.wait_for_selector("body[data-done='1']", timeout=120_000)
        size = page.evaluate(
            "[document.getElementById('after').naturalWidth, document.getElementById('after').naturalHeight]"
        )
        status = page.inner_text("#status")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert size == [224, 160] and "224x160" in status
    assert shot.stat().st_size > 1000
    print("screenshot:", shot)


def test_serve_config_yaml_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    conf = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(conf)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(conf)
    )
    from serve.app import deployment_names

    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app"
    assert {d.name for d in app.deployments} == set(deployment_names(app.args["preset"])) == {"ingress", "diffuse"}
