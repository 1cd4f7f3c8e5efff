"""The endpoint's autoscaling: per-deployment Serve options are typed and checked (fast tests), and a load ramp on a
real multi-node Ray cluster scales the diffuse deployment out and back without failing a request (slow)."""

import shutil
import tempfile
import threading
import time

import pytest
import requests
from PIL import Image

import corpus
from conftest import free_port, png_bytes, wait_healthy

# ------------------------------------------------------------------------------------------ the options, typed


def test_misspelt_or_unknown_deployment_options_are_refused():
    from serve.app import build_app

    bad = [
        ({"diffuse": {"autoscaling_config": {"upscale_delay": 5}}}, "upscale_delay"),  # Serve alone would ignore it
        ({"diffuse": {"max_ongoing": 4}}, "max_ongoing"),
        ({"difuse": {"max_ongoing_requests": 4}}, r"no deployment named \['difuse'\]"),
        ({"encode": {"max_ongoing_requests": 4}}, r"no deployment named \['encode'\]"),  # `small` has none
        ({"diffuse": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}}, "max_replicas"),
        ({"diffuse": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 4}}}, "exclude each other"),
        ({"ingress": {"backpressure_config": {"status": 503}}}, "status"),
        ({"diffuse": {"graceful_shutdown_timeout_s": 20}}, "under the request deadline timeout_s=120s"),
    ]
    for deployments, message in bad:
        with pytest.raises(ValueError, match=message):
            build_app({"preset": "small", "gpu": False, "deployments": deployments})


def test_an_override_keeps_the_defaults_it_does_not_name_and_the_drain_covers_the_deadline():
    from serve.deployments import DRAIN_MARGIN_S, DeploymentArgs, deployment_options

    auto = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1}
    conf = deployment_options("diffuse", {"diffuse": DeploymentArgs(autoscaling_config=auto)}, timeout_s=300)
    assert conf == {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.5}, "autoscaling_config": auto,
                    "graceful_shutdown_timeout_s": 300 + DRAIN_MARGIN_S}  # fmt: skip
    given = deployment_options("ingress", {"ingress": DeploymentArgs(graceful_shutdown_timeout_s=400)}, 300)
    assert given["graceful_shutdown_timeout_s"] == 400 and given["max_queued_requests"] == 64


# ------------------------------------------------------------------------------------------ under load
CLIENTS = 4  # closed loop: each client posts its next request when its last one is answered
TRICKLE = 2  # clients kept on while the deployment scales back: both replicas busy when one is removed
IMAGE = (48, 64)  # 48x64 -> 192x256: ~0.5 s of diffusion on one core, ~20 ms of HTTP, decode and encode around it
HOLD_S = 12  # full load after the scale-up, for the "after" figures
MAX_REQUESTS = 400  # bounds on the whole load, whatever happens
MAX_LOAD_S = 150
ARGS = {
    "preset": "small", "threads": 1, "max_batch_tiles": 8, "timeout_s": 60, "max_in_flight": 16,
    "deployments": {
        # one diffuse replica per worker node (the "diffuser" resource); ingress and the controller on the head
        "ingress": {"ray_actor_options": {"num_cpus": 0.1, "resources": {"head": 0.1}}},
        "diffuse": {
            "max_ongoing_requests": 1,  # one request at a time per replica: the rest wait in the ingress's queue
            "graceful_shutdown_wait_loop_s": 0.5,
            "ray_actor_options": {"num_cpus": 1, "resources": {"diffuser": 1}},
            "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 2,
                "target_ongoing_requests": 2,  # 3 or 4 clients: 2 replicas; 2 clients: 1
                "upscale_delay_s": 10, "downscale_delay_s": 3,  # 10 s: enough one-replica requests to measure
                "look_back_period_s": 2, "metrics_interval_s": 0.5,
            },
        },
    },
}  # fmt: skip


@pytest.fixture
def endpoint(monkeypatch):
    """A head (1 logical CPU: ingress, Serve's controller and proxy) and two worker nodes of 1 CPU, each its own
    raylet on this machine (ray.cluster_utils.Cluster), with a temp dir (RAY_TMPDIR: its session and its address file,
    so no other `ray.init()` on this machine finds this cluster) and ports of their own; the app deployed through
    serve.app:build_app with ARGS. Everything is shut down, also on failure."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve.app import build_app

    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", temp)
    node = {"num_cpus": 1}
    head = {**node, "resources": {"head": 1}, "include_dashboard": False, "gcs_server_port": free_port(),
            "dashboard_agent_listen_port": free_port(), "ray_client_server_port": free_port()}  # fmt: skip
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for _ in range(2):
            cluster.add_node(**node, resources={"diffuser": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({**ARGS, "bind_host": "127.0.0.1"}), name="pidray", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 240)
        yield url
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


class Load:
    """Closed-loop HTTP clients on threads: client i posts back-to-back while i < `active`; each answer is recorded
    as (start, end, status). Bounded in requests and time; `stop()` ends it."""

    def __init__(self, url: str, body: bytes):
        self.url, self.body, self.active = url, body, 0
        self.records: list[tuple[float, float, object]] = []
        self.deadline = time.monotonic() + MAX_LOAD_S
        self._stop, self._lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline and len(self.records) < MAX_REQUESTS

    def _client(self, i: int) -> None:
        session = requests.Session()
        headers = {"Content-Type": "image/png"}
        while self._running():
            if i >= self.active:
                time.sleep(0.05)
                continue
            t0 = time.monotonic()
            try:
                r = session.post(self.url + "/v1/upscale", data=self.body, headers=headers, timeout=60)
                ok = r.status_code == 200 and r.headers.get("x-pidray-size") == f"{IMAGE[1] * 4}x{IMAGE[0] * 4}"
                status = 200 if ok else f"{r.status_code} {r.text[:200]}"
            except requests.RequestException as e:
                status = f"{type(e).__name__}: {e}"
            with self._lock:
                self.records.append((t0, time.monotonic(), status))

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=90)


class Replicas:
    """serve.status()'s diffuse replica states, sampled every 0.25 s on a thread: [(time, {state: count})]."""

    def __init__(self):
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        from ray import serve

        deadline = time.monotonic() + MAX_LOAD_S + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            states = serve.status().applications["pidray"].deployments["diffuse"].replica_states
            self.samples.append((time.monotonic(), {getattr(k, "value", k): n for k, n in states.items()}))
            time.sleep(0.25)

    def running(self) -> int:
        return self.samples[-1][1].get("RUNNING", 0) if self.samples else 0

    def first(self, predicate, after: float = 0.0) -> float | None:
        return next((t for t, s in self.samples if t >= after and predicate(s)), None)

    def wait(self, predicate, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.samples and predicate(self.samples[-1][1]):
                return self.samples[-1][0]
            time.sleep(0.1)
        raise AssertionError(f"replicas never reached the state within {seconds}s: {self.samples[-5:]}")

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@pytest.mark.slow
def test_diffuse_scales_out_under_a_load_ramp_and_back_without_failing_a_request(endpoint):
    """The bottleneck: a diffuse replica diffuses one request at a time (max_ongoing_requests=1) on one torch
    thread (threads=1, one logical CPU), so under 4 closed-loop clients requests queue in the ingress behind one
    replica and each waits for ~3 others: latency ~4x the service time. Serve's autoscaler sees ~4 requests queued
    and running against a target of 2 per replica and starts a second replica on the second worker node; it takes
    requests from the same queue and runs on the machine's other core, so each request waits for ~1 other:
    latency ~2x the service time. That gain is real only because this machine has two cores and a replica uses
    one; the HTTP, decode and PNG encode around the diffusion (~20 ms of the ~0.5 s) and Ray's own processes share
    them. Scale-down: the load falls to 2 clients (target: 1 replica) with both replicas busy, so the replica Serve
    removes is holding a request; it must finish it (graceful drain) — no request may fail, up or down."""
    import ray

    body = png_bytes(Image.fromarray(corpus._rgb(*IMAGE, 0)))
    for _ in range(2):  # warm: the first request through the whole chain
        assert requests.post(endpoint + "/v1/upscale", data=body, headers={"Content-Type": "image/png"},
                             timeout=60).status_code == 200  # fmt: skip
    t_single = []
    for _ in range(3):
        t0 = time.monotonic()
        requests.post(endpoint + "/v1/upscale", data=body, headers={"Content-Type": "image/png"}, timeout=60)
        t_single.append(time.monotonic() - t0)

    replicas = Replicas()
    load = Load(endpoint, body)
    try:
        t_begin = time.monotonic()
        for n in range(1, CLIENTS + 1):  # the ramp: one more client every 0.5 s
            load.active = n
            time.sleep(0.5)
        t_full = time.monotonic()
        t_up = replicas.wait(lambda s: s.get("RUNNING", 0) >= 2, 120)
        t_decided = replicas.first(lambda s: sum(s.values()) >= 2)  # the second replica appears (STARTING)
        time.sleep(HOLD_S)
        spare_diffusers = ray.available_resources().get("diffuser", 0)  # 0: a replica on each worker node
        t_trickle = time.monotonic()
        load.active = TRICKLE
        t_down = replicas.wait(lambda s: s.get("RUNNING", 0) == 1 and sum(s.values()) == 1, 90)
        t_stopping = replicas.first(lambda s: s.get("RUNNING", 0) < 2 or s.get("STOPPING", 0) > 0, after=t_trickle)
        time.sleep(2)
        load.active = 0  # the load stops
        time.sleep(3)
        t_idle_end = time.monotonic()
    finally:
        load.stop()
        replicas.stop()

    recs = load.records
    failures = [r for r in recs if r[2] != 200]
    # answered with one replica (none starting yet) once all clients were on; some waited in a shorter queue
    # during the ramp, which only lowers these figures
    before = [e - s for s, e, _ in recs if t_full <= e <= t_decided]
    starting = [e - s for s, e, _ in recs if t_decided < e and s < t_up]
    after = [e - s for s, e, _ in recs if s >= t_up and e <= t_trickle]  # 4 clients, two replicas
    drained = [r for r in recs if r[0] < t_down and r[1] > t_stopping]  # in flight while a replica was removed
    counts, last = [], None
    for t, s in replicas.samples:  # the replica counts over time, as changes
        now = {k: v for k, v in sorted(s.items()) if v}
        if now != last:
            counts.append(f"{t - t_begin:+.1f}s {now}")
            last = now
    w_before, w_after = t_decided - t_full, t_trickle - t_up
    print(f"\nautoscale: one request alone {min(t_single):.2f} s; {len(recs)} requests under load, "
          f"{len(failures)} failed")  # fmt: skip
    print("diffuse replicas over time (from the ramp's start):", "; ".join(counts))
    print(
        f"  before (1 replica, {CLIENTS} clients, {w_before:.1f} s): {len(before)} requests, "
        f"p50 {_pct(before, 0.5):.2f} s, p95 {_pct(before, 0.95):.2f} s, {len(before) / w_before:.2f} req/s"
    )
    if starting:
        print(
            f"  while the 2nd replica started: {len(starting)} requests, p50 {_pct(starting, 0.5):.2f} s, "
            f"p95 {_pct(starting, 0.95):.2f} s"
        )
    print(
        f"  after (2 replicas, {CLIENTS} clients, {w_after:.1f} s): {len(after)} requests, "
        f"p50 {_pct(after, 0.5):.2f} s, p95 {_pct(after, 0.95):.2f} s, {len(after) / w_after:.2f} req/s"
    )
    print(
        f"  scale-up: full load -> 2nd replica started {t_decided - t_full:.1f} s, -> running {t_up - t_full:.1f} "
        f"s; scale-down: {TRICKLE} clients -> replica removed {t_stopping - t_trickle:.1f} s, -> 1 replica "
        f"{t_down - t_trickle:.1f} s; {len(drained)} requests in flight during the removal, all answered; "
        f"spare diffuser slots at full scale: {spare_diffusers:g}; load phase {t_idle_end - t_begin:.1f} s"
    )

    # What autoscaling guarantees, whatever this machine's speed: every request answered (200), up and down; the
    # replica count goes 1 -> 2 -> 1, one replica per worker node; requests were answered in each phase; the removed
    # replica drained the requests it held. How many requests a phase holds, and how much faster two replicas are,
    # depend on the cores the machine has free (on a loaded one, 5 and 2 requests): printed above, not asserted.
    assert failures == [], failures[:5]
    assert replicas.samples[0][1].get("RUNNING", 0) == 1, replicas.samples[0]  # one replica before the load
    assert max(s.get("RUNNING", 0) for _, s in replicas.samples) == 2 and replicas.running() == 1
    assert t_full < t_decided <= t_up < t_trickle <= t_stopping <= t_down, (t_full, t_decided, t_up, t_stopping)
    assert spare_diffusers == 0  # the two replicas are on the two worker nodes
    assert before and after, (len(before), len(after))
    # The one ordering of latencies that holds on any machine: under full load, waiting behind 3 other requests for
    # one replica is slower than one request alone
    assert _pct(before, 0.5) > min(t_single), (before, t_single)
    assert drained, "no request was in flight while the replica was removed: the drain was not exercised"
