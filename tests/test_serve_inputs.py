"""Hostile input over real HTTP, one Serve app for all of it: a slow latent parse never stalls an upscale and the
deadline counts from arrival; bodies and fields of the wrong type, depth or size get a 4xx with a sentence, never a
500. Marked slow."""

import io
import json
import os
import struct
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save as st_save

from conftest import endpoint_stand_ins, free_port, wait_healthy

pytestmark = pytest.mark.slow
OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, golden_dir):
    import ray
    from ray import serve

    from serve.run import start

    pid, t2i, gemma = endpoint_stand_ins(tmp_path_factory.mktemp("inputs"), golden_dir)
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": "serve_hold.install", "env_vars": {"PYTHONPATH": path}},
    )
    args = {"preset": pid.preset, "weights": pid.weights, "options": {"overlap": 1}, "decode_concurrency": 2,
            "generate": {"preset": str(t2i), "text_encoder": str(gemma)}, "max_cost_mpx_steps": 4}  # fmt: skip
    url = start(args, port=free_port())
    wait_healthy(url, 300)
    yield url
    serve.shutdown()
    ray.shutdown()


def _latent(hold: bool = False) -> bytes:
    z = torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(0))
    return st_save({"z": z}, metadata={"note": "HOLD-PARSE"} if hold else None)


def _png(hw=(24, 24)) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


def test_held_latent_parses_never_stall_an_upscale_and_the_deadline_counts_from_arrival(app):
    """Two decodes whose latent parse takes 6 s hold both decode_concurrency slots: a small upscale still answers
    while they are held; a decode that asks for timeout=1 with a held parse is answered 504 at about 1 s."""
    done = []

    def held():
        r = requests.post(app + "/v1/decode", data=_latent(hold=True), headers=OCTET, timeout=120)
        done.append((time.time(), r.status_code))

    threads = [threading.Thread(target=held) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.time()
    r = requests.post(app + "/v1/upscale", data=_png(), headers={"Content-Type": "image/png"}, timeout=120)
    answered = time.time()
    assert r.status_code == 200, r.text
    assert not done, f"the upscale waited for the held parses ({answered - t0:.1f} s)"
    t0 = time.time()
    r = requests.post(app + "/v1/decode?timeout=1", data=_latent(hold=True), headers=OCTET, timeout=120)
    assert r.status_code == 504 and time.time() - t0 < 3.5, (r.status_code, time.time() - t0, r.text)
    for t in threads:
        t.join()
    assert [s for _, s in done] == [200, 200]


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(12):
            npy = io.BytesIO()
            np.save(npy, np.zeros((16, 1024, 1024), np.float32))  # 64 MiB of zeros: ~64 KiB deflated
            z.writestr(f"m{i}.npy", npy.getvalue())
    return buf.getvalue()


def _st_raw(header: bytes, length=None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header


@pytest.mark.parametrize(
    "path,body,status,message",
    [("/v1/decode", _st_raw(b'{"a":"x"}'), 400, "dtype, shape and data_offsets"),
     ("/v1/decode", _st_raw(b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"), 400, "nests"),
     ("/v1/decode", _st_raw(b'{"a":{"dtype":"F32","shape":[16,1,1],"data_offsets":[0,64]}}', 1 << 20), 400,
      "claims 1,048,576 bytes"),
     ("/v1/decode?id=m0", None, 413, "would inflate to"),
     ("/v1/decode?preset=/etc/hosts.json", _st_raw(b"{}"), 422, "serves preset"),
     ("/v1/decode?caption=%ED%A0%80", None, 200, ""),
     ("/v1/upscale?quality=1e400", None, 422, "quality must be int"),
     ("/v1/upscale?scale=nan", None, 422, "scale"), ("/v1/upscale?timeout=inf", None, 422, "timeout")],
)  # fmt: skip
def test_hostile_decode_and_upscale_bodies_and_params(app, path, body, status, message):
    if body is None:
        body = _zip_bomb() if "m0" in path else _latent() if "decode" in path else _png()
    ctype = {"Content-Type": "image/png"} if "upscale" in path else OCTET
    r = requests.post(app + path, data=body, headers=ctype, timeout=120)
    assert r.status_code == status, r.text
    if status != 200:
        assert message in r.json()["error"] and "Traceback" not in r.text, r.text


@pytest.mark.parametrize(
    "body,status,message",
    [('{"prompt": "a cat", "quality": 1e400}', 422, "quality must be an integer"),
     ('{"prompt": "a cat", "format": {"a": 1}}', 422, "format must be a string"),
     ('{"prompt": "a cat", "format": ["png"]}', 422, "format must be a string"),
     ("[" * 100_000 + "]" * 100_000, 400, "nests"),
     ('{"prompt": "a cat", "negative_prompt": {}}', 422, "negative_prompt must be a string"),
     ('{"prompt": "a \\ud800 cat"}', 422, "not valid text"),
     ('{"prompt": "a cat", "seed": 1e400}', 422, "seed must be an integer"),
     ('{"prompt": "a cat", "size": [1e400, 16]}', 422, "size must be"),
     ('{"prompt": "a cat", "steps": true}', 422, "steps must be an integer"),
     ('{"prompt": "a cat", "shift": NaN}', 422, "finite"),
     (json.dumps({"prompt": "a cat", "negative_prompt": "x" * 300_000}), 413, "over the limit"),
     (json.dumps({"prompt": "a cat", "negative_prompt": "x" * 5000}), 413, "over the limit of 4,000")],
)  # fmt: skip
def test_generate_fields_of_the_wrong_type_depth_or_size_get_4xx(app, body, status, message):
    r = requests.post(app + "/v1/generate", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "Traceback" not in r.text, r.text
    assert requests.get(app + "/healthz", timeout=10).status_code == 200
