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

from pipeline.stages import run_stage

import corpus
from conftest import ROOT, free_port, png_bytes, wait_healthy

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RAW = {**AUTH, "Content-Type": "image/png"}  # a raw body must say it is an image
CAPACITY = 8  # the ingress's max_in_flight below: past it, 503 + Retry-After
BODY_TIMEOUT = 4
MAX_BYTES = 8 << 20


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
        "preset": "small", "token": TOKEN, "max_batch_tiles": 8, "batch_wait_s": 0.05, "max_in_flight": CAPACITY,
        "body_timeout_s": BODY_TIMEOUT, "allowed_origins": ["http://allowed.example"], "max_bytes": MAX_BYTES,
    }  # fmt: skip
    url = start(args, port=free_port(), num_cpus=2)
    wait_healthy(url, 180)
    yield url
    serve.shutdown()
    ray.shutdown()


def _img(h=24, w=32, seed=0):
    return png_bytes(Image.fromarray(corpus._rgb(h, w, seed)))


def test_round_trip_and_determinism(endpoint):
    data = _img(30, 41)
    r1 = requests.post(endpoint + "/v1/upscale?seed=7", data=data, headers=RAW, timeout=120)
    assert r1.status_code == 200, r1.text
    assert r1.headers["content-type"] == "image/png" and r1.headers["x-pidray-seed"] == "7"
    out = np.asarray(Image.open(io.BytesIO(r1.content)).convert("RGB"), dtype=np.float64)
    assert out.shape == (120, 164, 3)
    ref = np.asarray(Image.open(io.BytesIO(data)).resize((164, 120), Image.BICUBIC), dtype=np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((out - ref) ** 2))
    assert psnr > 25, psnr  # an upscale of this picture, not noise
    r2 = requests.post(endpoint + "/v1/upscale?seed=7", data=data, headers=RAW, timeout=120)
    assert r2.content == r1.content
    form = {"seed": "7", "format": "jpeg", "quality": "80"}
    files = {"image": ("x.png", data, "image/png")}
    multipart = requests.post(endpoint + "/v1/upscale", files=files, data=form, headers=AUTH, timeout=120)
    assert multipart.status_code == 200 and multipart.headers["content-type"] == "image/jpeg"


def test_large_outputs_can_go_to_s3(endpoint, s3_out):
    import boto3

    r = requests.post(endpoint + "/v1/upscale?store=s3&seed=1", data=_img(20, 30), headers=RAW, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["uri"].startswith("s3://results/upscaled/") and body["size"] == "120x80"
    obj = boto3.client("s3", endpoint_url=s3_out).get_object(Bucket="results", Key=f"upscaled/{body['key']}")
    assert Image.open(io.BytesIO(obj["Body"].read())).size == (120, 80)


def test_models_and_health(endpoint):
    m = requests.get(endpoint + "/v1/models", timeout=10).json()
    assert m["served"] == "small" and m["presets"]["small"]["scale"] == 4 and "flux-2k" in m["presets"]
    assert requests.get(endpoint + "/healthz", timeout=10).json()["status"] == "ok"


def test_openapi_schema_lists_every_parameter(endpoint):
    """/openapi.json (and the /docs page on it) describe every request option with its type, range and default,
    from the same declaration the requests are checked against."""
    from pipeline.options import OVERRIDES
    from serve.params import DECODE_PARAMS

    spec = requests.get(endpoint + "/openapi.json", timeout=30).json()
    up = {p["name"]: p["schema"] for p in spec["paths"]["/v1/upscale"]["post"]["parameters"]}
    dec = {p["name"] for p in spec["paths"]["/v1/decode"]["post"]["parameters"]}
    assert set(OVERRIDES) | {"timeout", "store"} <= set(up) and set(DECODE_PARAMS) <= dec
    assert up["steps"] == {"type": "integer", "minimum": 1, "maximum": 200} and up["quality"]["default"] == 95
    gen = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    seed = gen["properties"]["seed"]
    assert gen["required"] == ["prompt"] and (seed["type"], seed["minimum"], seed["default"]) == ("integer", 0, 0)
    page = requests.get(endpoint + "/docs", timeout=30)
    assert page.status_code == 200 and "/openapi.json" in page.text


def test_auth_required(endpoint):
    assert requests.post(endpoint + "/v1/upscale", data=_img(), timeout=30).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    r = requests.post(endpoint + "/v1/upscale", data=_img(), headers=bad, timeout=30)
    assert r.status_code == 401 and r.json()["error"] == "missing or invalid bearer token"


@pytest.mark.parametrize(
    "query,message",
    [("steps=9", "steps must be in 1..4 for the distilled preset small"), ("seed=abc", "seed must be int"),
     ("cfg_scale=5", "apply to the undistilled presets"), ("shift=1e400", r"shift must be in \[0.1, 100\]"),
     ("cfg_scale=nan", r"cfg_scale must be in \[0, 50\]"), ("steps=201", r"steps must be an integer in 1..200"),
     ("degrade_sigma=2", r"degrade_sigma must be in \[0, 1\]"), ("preset=flux-2k", "serves preset 'small'"),
     ("format=gif2", "unknown output format"), ("colour=red", "unknown parameter")],
)  # fmt: skip
def test_bad_parameters_are_422(endpoint, query, message):
    r = requests.post(f"{endpoint}/v1/upscale?{query}", data=_img(), headers=RAW, timeout=30)
    assert r.status_code == 422 and re.search(message, r.json()["error"]), r.text


def test_bad_input_corpus_gets_4xx_and_replica_stays_healthy(endpoint):
    for key, (data, expect) in corpus.build().items():
        r = requests.post(endpoint + "/v1/upscale", data=data, headers=RAW, timeout=120)
        if expect[0] == "fail":
            assert r.status_code in (400, 413), (key, r.status_code, r.text)
            assert re.search(expect[1], r.json()["error"]), (key, r.text)
            assert "Traceback" not in r.text
        else:
            assert r.status_code == 200, (key, r.text)
            assert Image.open(io.BytesIO(r.content)).size == expect[1], key
    r = requests.post(endpoint + "/v1/upscale", data=_img(), headers=RAW, timeout=60)
    assert r.status_code == 200 and requests.get(endpoint + "/healthz", timeout=10).status_code == 200


def test_too_large_body_is_413(endpoint):
    big = b"\x89PNG" + b"\x00" * (MAX_BYTES + 1)
    r = requests.post(endpoint + "/v1/upscale", data=big, headers=RAW, timeout=60)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def test_load_at_twice_capacity_only_200_and_503(endpoint):
    import aiohttp

    data = _img(16, 16)
    statuses, latencies, retry_after = [], [], []

    async def worker(session, stop):
        while time.time() < stop:
            t0 = time.perf_counter()
            async with session.post(endpoint + "/v1/upscale", data=data, headers=RAW) as r:
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
        assert not page.is_visible("#token")  # no token field until the server asks for one
        page.set_input_files("#file", str(src))
        page.click("#go")
        page.wait_for_selector("#token", state="visible", timeout=60_000)  # it answered 401: now there is one
        assert "needs a token" in page.inner_text("#status")
        page.fill("#token", TOKEN)
        page.click("#go")
        page.wait_for_selector("body[data-done='1']", timeout=120_000)
        shown = page.evaluate("[document.getElementById('stage').clientWidth, "
                              "document.getElementById('viewport').clientWidth]")  # fmt: skip
        labels = (page.inner_text("#labelBefore"), page.inner_text("#labelAfter"))
        page.click("#zoom button[data-zoom='2']")
        zoomed = page.evaluate("document.getElementById('stage').clientWidth")
        page.click("#zoom button[data-zoom='fit']")
        box = page.locator("#stage").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.25, box["y"] + box["height"] / 2)  # the slider lies on the image
        split = float(page.input_value("#slider"))
        size = page.evaluate(
            "[document.getElementById('after').naturalWidth, document.getElementById('after').naturalHeight]"
        )
        name_png = page.get_attribute("#download", "download")
        page.evaluate("document.body.dataset.done = '0'")
        page.select_option("#format", "jpeg")  # the download name follows the format that came back
        page.click("#go")
        page.wait_for_selector("body[data-done='1']", timeout=120_000)
        name_jpeg = page.get_attribute("#download", "download")
        status = page.inner_text("#status")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert size == [224, 160] and "224x160" in status
    assert "diffusion" in status and "=" not in status  # a readable timing line, not the raw header
    assert labels == ("before", "after") and shown[0] <= shown[1] and zoomed == 2 * 224
    assert 15 < split < 35, split
    assert (name_png, name_jpeg) == ("photo_x4.png", "photo_x4.jpg")
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
    names = {d.name for d in app.deployments}
    assert names == set(deployment_names(app.args["preset"])) == {"ingress", "encode", "diffuse"}


# ---------------------------------------------------------------------------------------------- issue 10: safety
def _pids(marker: bytes) -> list[int]:
    from pathlib import Path

    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]


def _ingress_pids() -> list[int]:
    return _pids(b"ServeReplica:pidray:ingress")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _small_request_seconds(endpoint) -> float:
    t0 = time.perf_counter()
    r = requests.post(endpoint + "/v1/upscale", data=_img(16, 16), headers=RAW, timeout=120)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def test_f9_timed_out_request_stops_consuming_the_replica(endpoint):
    big = _img(160, 160)  # 49 tiles x 4 steps: ~10 s of diffusion on 2 cores if it were left running
    before = requests.get(endpoint + "/v1/stats", timeout=10).json()["stopped"]
    t0 = time.perf_counter()
    r = requests.post(endpoint + "/v1/upscale?timeout=2", data=big, headers=RAW, timeout=60)
    assert r.status_code == 504 and r.json()["kind"] == "cancelled", r.text
    assert time.perf_counter() - t0 < 5
    after_timeout = _small_request_seconds(endpoint)
    print(f"small request right after a 504: {after_timeout:.2f}s")
    assert after_timeout < 6, "the timed-out request's work kept the replica busy"
    assert requests.get(endpoint + "/v1/stats", timeout=10).json()["stopped"] > before
    assert requests.get(endpoint + "/healthz", timeout=10).status_code == 200


def test_f9_disconnected_client_stops_consuming_the_replica(endpoint):
    import socket
    from urllib.parse import urlparse

    u = urlparse(endpoint)
    body = _img(160, 160)
    head = (f"POST /v1/upscale HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    before = requests.get(endpoint + "/v1/stats", timeout=10).json()["stopped"]
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(head + body)
        time.sleep(1.5)  # the work has started; the client goes away
    time.sleep(0.5)
    seconds = _small_request_seconds(endpoint)
    print(f"small request after a client disconnected mid-work: {seconds:.2f}s")
    assert seconds < 6
    deadline = time.time() + 10
    while requests.get(endpoint + "/v1/stats", timeout=10).json()["stopped"] <= before:
        assert time.time() < deadline, "the disconnected request's work was not stopped"
        time.sleep(0.2)


def test_f9_admission_bounds_work_per_request(endpoint):
    r = requests.post(endpoint + "/v1/upscale", data=_img(512, 512), headers=RAW, timeout=30)
    assert r.status_code == 413 and "Mpx·steps" in r.json()["error"], r.text
    r = requests.post(endpoint + "/v1/upscale?scale=16", data=_img(8, 1100), headers=RAW, timeout=30)
    assert r.status_code == 413 and "16384" in r.json()["error"], r.text  # the final size, not the native 4x


def test_f10_poisoned_request_does_not_fail_its_batch_mates(endpoint):
    import concurrent.futures as cf

    def post(query):
        return requests.post(f"{endpoint}/v1/upscale?{query}", data=_img(16, 16, 3), headers=RAW, timeout=120)

    queries = [f"seed={i}" for i in range(6)] + ["seed=18446744073709551616", "seed=-1"]
    with cf.ThreadPoolExecutor(len(queries)) as pool:
        results = list(pool.map(post, queries))
    for q, r in zip(queries, results):
        if q.endswith(("551616", "-1")):
            assert r.status_code == 422 and "2^63" in r.json()["error"], r.text
        else:
            assert r.status_code in (200, 503), (q, r.status_code, r.text)
    assert sum(r.status_code == 200 for r in results) >= 4


def test_f10_failure_inside_a_batch_is_isolated(endpoint):
    """A malformed row in a batch fails alone: the envelope every driver (and the Serve batcher) uses."""
    from pipeline.graph import StageGraph

    graph = StageGraph()
    decode, encode, diffuse, _ = graph.build_all()
    rows = [graph.workflow.enter({"key": f"r{seed}", "bytes": _img(16, 16, seed), "seed": seed}) for seed in (1, 2, 3)]
    rows = run_stage(encode, "encode", run_stage(decode, "decode", rows))
    rows[1]["latent"] = rows[1]["latent"][:, :5, :5]  # does not match its tile plan
    out = run_stage(diffuse, "diffuse", rows)
    assert [r.get("status") for r in out] == [None, "failed", None]
    assert "tile plan" in out[1]["error"] and out[0]["pixels"].shape == out[2]["pixels"].shape == (64, 64, 3)


def _proxy_pids() -> list[int]:
    return _pids(b"ProxyActor")


def _cmdline(proc) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_f11_unbounded_uploads_never_fill_memory(endpoint):
    """A 200 MiB chunked body (no Content-Length) and a lying Content-Length: refused at once, memory flat."""
    import socket
    from urllib.parse import urlparse

    pids = _ingress_pids() + _proxy_pids()
    assert len(pids) >= 2, "ingress or proxy process not found"
    rss0 = {p: _rss_mb(p) for p in pids}
    sent = [0]

    def body():
        for _ in range(200):  # 200 MiB against a limit of 8 MiB
            sent[0] += 1
            yield b"\0" * (1 << 20)

    t0 = time.perf_counter()
    try:
        r = requests.post(endpoint + "/v1/upscale", data=body(), headers=RAW, timeout=60)
        status, text = r.status_code, r.text
    except requests.ConnectionError:  # the server closed while we still sent: the answer came before the body
        status, text = 411, "Content-Length"
    assert status == 411 and "Content-Length" in text, text
    # A declared length under the limit, then more bytes than declared: HTTP framing stops at the declared length.
    u = urlparse(endpoint)
    head = (f"POST /v1/upscale HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: image/png\r\nContent-Length: 100\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((u.hostname, u.port)) as s:
        try:
            s.sendall(head + b"\0" * (4 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered the declared 100 bytes and hung up on the excess: read what it said
        try:
            reply = s.recv(4096).decode(errors="replace")
        except ConnectionResetError:
            reply = ""
    reply = reply or "HTTP/1.1 400 (the server closed the connection on the excess bytes)"
    assert reply.startswith("HTTP/1.1 400"), reply[:300]  # ours (not an image) or the server's framing error
    growth = {p: _rss_mb(p) - rss0[p] for p in pids}
    print(f"chunked 200 MiB offered: {status} after {sent[0]} MiB sent, {time.perf_counter() - t0:.2f}s; RSS growth "
          f"(MB) ingress+proxy {[round(g) for g in growth.values()]}")  # fmt: skip
    assert max(growth.values()) < 100, "an upload was buffered past the limit"


def test_f12_huge_images_never_stall_the_event_loop(endpoint):
    import concurrent.futures as cf

    bilevel = png_bytes(Image.new("1", (8000, 8000), 1))  # 64 Mpx of 1-bit PNG: decoding it takes seconds

    def post(_):
        return requests.post(endpoint + "/v1/upscale", data=bilevel, headers=RAW, timeout=120)

    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, i) for i in range(3)]
        worst = 0.0
        while not all(f.done() for f in futures):
            t0 = time.perf_counter()
            assert requests.get(endpoint + "/v1/models", timeout=10).status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.05)
    print(f"/v1/models worst latency while three 8000x8000 PNGs were posted: {worst * 1000:.0f} ms")
    assert all(f.result().status_code == 413 for f in futures)  # refused from the header, before decoding
    assert worst < 0.5


@pytest.mark.parametrize(
    "headers,status,message",
    [({"Content-Type": "text/plain"}, 415, "image/\\*"), ({}, 415, "Content-Type"),
     ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "image/\\*"),
     ({"Content-Type": "image/png", "Origin": "http://evil.example"}, 403, "cross-site"),
     ({"Content-Type": "image/png", "Host": "rebound.evil.example"}, 403, "not served here")],
)  # fmt: skip
def test_f13_cross_site_and_rebinding_requests_are_refused(endpoint, headers, status, message):
    r = requests.post(endpoint + "/v1/upscale", data=_img(), headers={**AUTH, **headers}, timeout=30)
    assert r.status_code == status and re.search(message, r.json()["error"]), r.text


def test_f13_allowed_and_same_origin_requests_pass(endpoint):
    for origin in ("http://allowed.example", endpoint):
        r = requests.post(endpoint + "/v1/upscale", data=_img(), headers={**RAW, "Origin": origin}, timeout=60)
        assert r.status_code == 200, (origin, r.text)


def test_f14_error_bodies_have_one_shape(endpoint):
    bad_multipart = requests.post(endpoint + "/v1/upscale", data=b"--zz\r\nno end", timeout=30,
                                  headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zz"})  # fmt: skip
    store = requests.post(endpoint + "/v1/upscale?store=ftp", data=_img(), headers=RAW, timeout=30)
    for r, status in ((bad_multipart, 400), (store, 422)):
        assert r.status_code == status and set(r.json()) == {"error", "kind"}, r.text
    assert "store must be 's3'" in store.json()["error"]


def test_f14_store_s3_unconfigured_is_refused_before_work():
    from pipeline.errors import BadParameter
    from pipeline.model.presets import get_preset
    from pipeline.stages import UpscaleOptions
    from serve.app import parse_params

    with pytest.raises(BadParameter, match="store=s3 is not configured"):
        parse_params({"store": "s3"}, get_preset("small"), UpscaleOptions(), s3_configured=False)
    assert parse_params({"store": "s3", "seed": "5"}, get_preset("small"), UpscaleOptions(), True) == {"seed": 5}


def test_overload_and_abuse_only_200_or_503_for_valid_requests(endpoint):
    """40 clients for 20 s: valid requests beside oversized, slow and poisoned ones."""
    import aiohttp

    pids = _ingress_pids()
    valid, abusive, peak = [], [], [max(_rss_mb(p) for p in pids)]
    good, header_bomb = _img(16, 16), corpus._png_header_only(100000, 100000)

    async def slow_body():
        for _ in range(40):
            yield b"\x89PNG" + b"\0" * 60
            await asyncio.sleep(0.25)

    bad = [  # (name, request kwargs, acceptable statuses)
        ("oversized pixels", {"data": header_bomb, "headers": RAW}, {413, 503}),
        ("oversized work", {"data": _img(600, 600), "headers": RAW}, {413, 503}),  # over 8 Mpx·steps
        ("poisoned seed", {"data": good, "headers": RAW, "params": {"seed": str(2**64)}}, {422, 503}),
        ("not an image", {"data": b"GIF89a garbage" * 10, "headers": RAW}, {400, 503}),
        ("text/plain", {"data": good, "headers": {**AUTH, "Content-Type": "text/plain"}}, {415, 503}),
        ("slow body", {"data": slow_body, "headers": {**RAW, "Content-Length": str(40 * 64)}}, {408, 503}),
    ]

    async def client(session, n, stop):
        while time.time() < stop:
            if n % 2 == 0:
                async with session.post(endpoint + "/v1/upscale", data=good, headers=RAW) as r:
                    await r.read()
                    valid.append(r.status)
                    if r.status == 503:
                        assert r.headers.get("Retry-After") and (await r.json())["kind"] == "busy"
                        await asyncio.sleep(0.2)
            else:
                name, kw, ok = bad[(n // 2 + len(abusive)) % len(bad)]
                kw = {**kw, "data": kw["data"]() if callable(kw["data"]) else kw["data"]}
                async with session.post(endpoint + "/v1/upscale", **kw) as r:
                    body = await r.json()
                    abusive.append((name, r.status, "error" in body and "Traceback" not in str(body), ok))

    async def sampler(stop):
        while time.time() < stop:
            peak.append(max(_rss_mb(p) for p in pids))
            await asyncio.sleep(0.2)

    async def main():
        stop = time.time() + 20
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            await asyncio.gather(sampler(stop), *(client(s, n, stop) for n in range(40)))

    asyncio.run(main())
    t_end = time.perf_counter()
    while requests.get(endpoint + "/healthz", timeout=10).status_code != 200:
        assert time.perf_counter() - t_end < 5, "the endpoint did not recover within 5 s"
        time.sleep(0.1)
    recovered = time.perf_counter() - t_end
    codes = {c: valid.count(c) for c in set(valid)}
    by_kind = {}
    for name, status, _, _ in abusive:
        by_kind.setdefault(name, set()).add(status)
    print(f"abuse: {len(valid)} valid requests {codes}; {len(abusive)} abusive {by_kind}; healthy after "
          f"{recovered:.2f}s; ingress peak RSS {max(peak):.0f} MB (start {peak[0]:.0f} MB)")  # fmt: skip
    assert set(codes) <= {200, 503} and codes.get(200, 0) > 0
    assert all(shape_ok and status in ok for _, status, shape_ok, ok in abusive), by_kind
    assert max(peak) - peak[0] < 400, "ingress memory grew without bound"
