"""The endpoint under cheap attacks: its settings are range-checked when the app is built (fast), and slow uploads
over real HTTP never close it to valid requests (slow: a real Serve app on 127.0.0.1)."""

import concurrent.futures as cf
import math
import re
import select
import socket
import threading
import time

import pytest
import requests
from PIL import Image

import corpus
from conftest import free_port, png_bytes, wait_healthy

# ------------------------------------------------------------------------------------------ settings, range-checked
BAD_SETTINGS = [
    ("decode_concurrency", 0), ("decode_concurrency", -1), ("max_cost_mpx_steps", math.nan),
    ("max_cost_mpx_steps", 0), ("max_cost_mpx_steps", -1.0), ("max_cost_mpx_steps", math.inf),
    ("max_bytes", -1), ("max_bytes", 0), ("max_bytes", 1e20), ("max_bytes", 2.5), ("timeout_s", -5),
    ("timeout_s", 0), ("timeout_s", math.inf), ("timeout_s", math.nan), ("body_timeout_s", 0),
    ("body_timeout_s", math.inf), ("body_grace_s", math.nan), ("body_min_bytes_per_s", 0), ("max_in_flight", 0),
    ("max_in_flight", -1), ("max_in_flight", True), ("max_uploads", 0), ("max_uploads_per_client", -1),
    ("threads", -1), ("threads", 1e9),
]  # fmt: skip


@pytest.mark.parametrize("name,value", BAD_SETTINGS, ids=[f"{n}={v}" for n, v in BAD_SETTINGS])
def test_out_of_range_setting_fails_building_the_app_naming_it_and_its_range(name, value):
    from serve.app import build_app

    with pytest.raises(ValueError, match=rf"{name} must be (an integer in -?\d+\.\.\d+|a number in \[[^]]+\])"):
        build_app({"preset": "small", "gpu": False, name: value})


@pytest.mark.parametrize(
    "output_s3,message",
    [({"uri": "file:///etc"}, r"output_s3.uri must be an s3://bucket/prefix URI, got 'file:///etc'"),
     ({"uri": "/tmp/out"}, "output_s3.uri must be an s3://"), ({}, "output_s3.uri must be"),
     ({"uri": "s3://"}, "output_s3: invalid S3 URI"), ({"uri": "s3://b/p", "s3": {"bogus": 1}}, "output_s3: .*bogus"),
     ({"uri": "s3://b/p", "url": "s3://c"}, r"output_s3 takes \['uri', 's3'\], not \['url'\]")],
)  # fmt: skip
def test_output_s3_must_be_an_s3_uri(output_s3, message):
    from serve.app import build_app

    with pytest.raises(ValueError, match=message):
        build_app({"preset": "small", "gpu": False, "output_s3": output_s3})


def test_the_reported_combination_is_refused_and_good_settings_build():
    from serve.app import AppArgs, build_app

    with pytest.raises(ValueError, match="decode_concurrency must be an integer in 1..256, got 0") as e:
        build_app({"decode_concurrency": 0, "max_cost_mpx_steps": math.nan, "timeout_s": 20, "gpu": False})
    assert "max_cost_mpx_steps must be a number in [0.01, 1e+06], got nan" in str(e.value)
    assert build_app({"preset": "small", "gpu": False}) is not None  # the defaults
    edges = {"max_in_flight": 1, "decode_concurrency": 1, "timeout_s": 1, "body_timeout_s": 600, "threads": 0,
             "max_cost_mpx_steps": 0.01, "max_bytes": 1024, "max_uploads": 1, "max_uploads_per_client": 1,
             "body_min_bytes_per_s": 1, "body_grace_s": 0.5,
             "output_s3": {"uri": "s3://results/upscaled", "s3": {"region": "us-east-1"}}}  # fmt: skip
    assert build_app({"preset": "small", "gpu": False, **edges}) is not None
    assert AppArgs.model_validate({"max_in_flight": "7", "timeout_s": "20"}).max_in_flight == 7  # YAML/CLI strings


# ------------------------------------------------------------------------------------------ slow uploads, over HTTP
GRACE_S = 6  # body_grace_s below: a body must keep up the minimum rate once this has passed
MAX_IN_FLIGHT = 4  # work slots: far fewer than the slow uploaders
PER_CLIENT = 4  # uploads one client address may have arriving at once
ADDRESSES = [f"127.0.0.{i}" for i in range(2, 7)]  # the slow uploaders' addresses: 5 x 4 = 20 arriving at once
EXTRA = 2  # more from the first address, past its bound: refused at once
DECLARED = 64 << 10  # each declares 64 KiB and sends one byte every TRICKLE_S
TRICKLE_S = 2.0


@pytest.fixture(scope="module")
def endpoint():
    import ray
    from ray import serve

    from serve.run import start

    args = {"preset": "small", "max_batch_tiles": 8, "max_in_flight": MAX_IN_FLIGHT, "timeout_s": 60,
            "body_timeout_s": 30, "body_grace_s": GRACE_S, "body_min_bytes_per_s": 16 << 10, "max_uploads": 32,
            "max_uploads_per_client": PER_CLIENT}  # fmt: skip
    url = start(args, port=free_port(), num_cpus=2)
    try:
        wait_healthy(url, 240)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


class Tricklers:
    """Slow uploaders on raw sockets, each from its own source address (all loopback): headers declaring DECLARED
    bytes, then one byte every TRICKLE_S until the server answers. One thread drives them all; bounded in time
    (`seconds`) and stopped by `join()`. `answers`: per uploader (address, seconds after its start, status, text)."""

    def __init__(self, url: str, sources: list[str], seconds: float):
        host, port = url.rsplit("//", 1)[1].split(":")
        head = (f"POST /v1/upscale HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
                f"Content-Length: {DECLARED}\r\n\r\n").encode()  # fmt: skip
        self.socks, self.answers, self.received, self.start = [], {}, {}, time.monotonic()
        self.deadline = self.start + seconds
        for src in sources:
            s = socket.socket()
            s.bind((src, 0))
            s.connect((host, int(port)))
            s.sendall(head + b"\x89")
            self.socks.append((src, s))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while len(self.answers) < len(self.socks) and time.monotonic() < self.deadline:
            waiting = {s: src for src, s in self.socks if s not in self.answers}
            readable, _, _ = select.select(list(waiting), [], [], 0.1)
            for s in readable:
                try:
                    more = s.recv(65536)
                except OSError:
                    more = b""
                self.received[s] = got = self.received.get(s, b"") + more
                head, _, body = got.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if more and not (length and len(body) >= int(length[1])):
                    continue  # the rest of the answer is on its way
                status = int(got.split()[1]) if got.startswith(b"HTTP/1.1 ") else 0
                self.answers[s] = (waiting[s], time.monotonic() - self.start, status, body.decode(errors="replace"))
            if time.monotonic() - last >= TRICKLE_S:
                last = time.monotonic()
                for s in waiting:
                    if s not in self.answers:
                        try:
                            s.send(b"\0")
                        except OSError:
                            pass

    def join(self) -> list[tuple]:
        self.thread.join(timeout=max(0.0, self.deadline - time.monotonic()) + 5)
        for _, s in self.socks:
            s.close()
        return list(self.answers.values())


@pytest.mark.slow
def test_slow_uploads_never_hold_the_work_slots_and_are_cut_by_the_minimum_rate(endpoint):
    """22 uploaders trickle a byte every 2 s into 64 KiB bodies from 5 loopback addresses, beside 4 work slots: they
    count as uploads, not work, so valid requests beside them get 200 while they trickle; past 4 arriving from one
    address the rest are refused at once (503); the others fall behind the minimum rate once the grace has passed
    and get 408 then, long before the 30 s body deadline."""
    image = png_bytes(Image.fromarray(corpus._rgb(16, 16, 0)))

    def post():
        return requests.post(endpoint + "/v1/upscale", data=image, headers={"Content-Type": "image/png"}, timeout=60)

    assert post().status_code == 200  # warm

    sources = [a for a in ADDRESSES for _ in range(PER_CLIENT)] + [ADDRESSES[0]] * EXTRA
    slow = Tricklers(endpoint, sources, seconds=GRACE_S + 20)
    try:
        deadline = time.monotonic() + 5
        while (stats := requests.get(endpoint + "/v1/stats", timeout=10).json())["receiving"] < len(ADDRESSES) * 4:
            assert time.monotonic() < deadline, f"the slow uploads did not all arrive: {stats}"
            time.sleep(0.1)
        with cf.ThreadPoolExecutor(MAX_IN_FLIGHT) as pool:  # as many valid requests as there are work slots
            valid = [f.result() for f in [pool.submit(post) for _ in range(MAX_IN_FLIGHT)]]
        health = requests.get(endpoint + "/healthz", timeout=10)
        models = requests.get(endpoint + "/v1/models", timeout=10)
        beside = time.monotonic() - slow.start
        still = requests.get(endpoint + "/v1/stats", timeout=10).json()
    finally:
        answers = slow.join()
    after = requests.get(endpoint + "/v1/stats", timeout=10).json()
    last = post()

    statuses = sorted(a[2] for a in answers)
    print(f"\nslow uploads: {len(sources)} uploaders, {stats['receiving']} arriving at once; valid beside them "
          f"{[r.status_code for r in valid]} within {beside:.1f} s ({still['receiving']} still arriving then); "
          f"answers {[(a[0], round(a[1], 1), a[2]) for a in sorted(answers, key=lambda a: a[1])]}")  # fmt: skip
    assert [r.status_code for r in valid] == [200] * MAX_IN_FLIGHT, [r.text[:200] for r in valid]
    assert health.status_code == 200 and models.status_code == 200
    assert still["receiving"] == len(ADDRESSES) * PER_CLIENT and beside < GRACE_S, (still, beside)  # still trickling
    assert len(answers) == len(sources), "some slow uploads were never answered"
    refused = [a for a in answers if a[2] == 503]
    assert len(refused) == EXTRA and {a[0] for a in refused} == {ADDRESSES[0]}, answers
    assert all(a[1] < 3 and "from this address" in a[3] for a in refused), refused
    cut = [a for a in answers if a[2] == 408]
    assert statuses == [408] * len(ADDRESSES) * PER_CLIENT + [503] * EXTRA, answers
    assert all(GRACE_S - 1 <= a[1] <= GRACE_S + 4 and "slower than 16,384 bytes/s" in a[3] for a in cut), cut
    assert after["receiving"] == 0 and after["in_flight"] == 0, after
    assert last.status_code == 200
