"""`pidray bench pipeline`: the Ray Data job vs the in-process loop over the same stage graph and model.

Both read the same N files from a folder and write to one, twice each in one process: the first run pays for
start-up, the second (Ray already up) is the warm figure. `--large SIDE` adds one large tiled image.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions

# What a benchmark runs (jobs.pipeline, pipeline.runtime, pipeline.stages) loads torch: imported where it starts, so
# that the parser, --help and usage errors answer at once.


def _make_inputs(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from pipeline.quality import load_photos

    photos = load_photos(min_size=size)
    for i in range(n):
        img = photos[i % len(photos)]
        top = (i * 37) % (img.shape[1] - size + 1)
        arr = ((img[:, top : top + size, :size] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"img_{i:04d}.png")


def _runs(src: Path, out: Path, model: ModelOptions, options: UpscaleOptions, **kw) -> dict[str, dict]:
    """Each runner twice on the same inputs in this process: the first pays for start-up (Ray, actors, models),
    the second is the warm one (Ray already up). Throughput in images per second of the whole job."""
    from jobs.pipeline import JobConfig, run_job

    res = {}
    for name, local in (("loop", True), ("ray", False)):
        times = []
        for k in range(2):
            cfg = JobConfig(str(src), str(out / f"{name}{k}"), model, options, progress=False, local=local, **kw)
            t0 = time.perf_counter()
            summary = run_job(cfg)
            times.append(time.perf_counter() - t0)
            assert summary.failed == 0, summary.line()
        res[name] = {"ok": summary.ok, "first_s": times[0], "warm_s": times[1], "warm_ips": summary.ok / times[1]}
    res["ratio_warm"] = res["ray"]["warm_ips"] / res["loop"]["warm_ips"]
    return res


def bench_pipeline(n: int, size: int, model: ModelOptions, options: UpscaleOptions, actors: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        _make_inputs(src, n, size)
        return _runs(src, Path(tmp), model, options, concurrency={"diffuse": actors} if actors else {})


def add_bench_parser(sub) -> None:
    from pipeline import doctor

    p = sub.add_parser("bench")  # its summary: pidray.cli.MAINTENANCE
    bsub = p.add_subparsers(dest="what", required=True)
    q = bsub.add_parser("pipeline", help="Ray Data job vs a plain in-process loop over the same stages")
    q.add_argument("-n", type=int, default=24, help="images")
    q.add_argument("--size", type=int, default=64, help="input side in pixels")
    q.add_argument("--preset", default="small")
    q.add_argument("--weights", default=None)
    q.add_argument("--diffuse-actors", type=int, default=None)
    q.add_argument("--large", type=int, default=0, help="also one tiled image of this side (warm, both runners)")
    q.set_defaults(fn=cmd_bench)
    q = bsub.add_parser("serve", help="Serve p50/p99 latency vs a direct in-process call of the same graph")
    q.add_argument("-n", type=int, default=30, help="sequential requests")
    q.add_argument("--size", type=int, default=32, help="input side in pixels")
    q.add_argument("--weights", default=None)
    q.set_defaults(fn=cmd_bench_serve)
    q = bsub.add_parser("kernels", help="Triton kernels and the whole forward at 2048²/3840² (pidray doctor's steps)")
    doctor.add_args(q)
    q.set_defaults(fn=doctor.cmd, steps="versions,kernels,forward")


def bench_serve(n: int, size: int, weights: str | None) -> dict:
    """Latency of one small upscale: direct (the same graph in this process) and over HTTP through Serve,
    interleaved call by call (a shared machine's speed drifts; both sides see the same drift). Also the part of a
    served request outside the stages' own work: its end-to-end time minus the stage timings it reports (proxy,
    ingress, handle hops, batching wait, serialisation)."""
    import io
    import socket

    import numpy as np
    import requests
    from PIL import Image

    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions
    from serve.run import start

    arr = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    graph = StageGraph(ModelOptions(weights=weights), UpscaleOptions())
    stages = graph.build_all()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start({"preset": "small", "weights": weights}, port=port)
    deadline = time.time() + 300
    while time.time() < deadline and requests.get(url + "/healthz", timeout=10).status_code != 200:
        time.sleep(1)
    session = requests.Session()

    def served() -> tuple[float, float]:
        t0 = time.perf_counter()
        r = session.post(url + "/v1/upscale", data=data, headers={"Content-Type": "image/png"}, timeout=120)
        dt = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        stage_s = sum(float(kv.split("=")[1]) for kv in r.headers["X-Pidray-Timings"].split(",") if "=" in kv)
        return dt, dt - stage_s

    def direct() -> float:
        t0 = time.perf_counter()
        next(graph.run_local([{"key": "b", "bytes": data}], stages))
        return time.perf_counter() - t0

    for _ in range(3):  # warm both
        direct(), served()
    times: dict[str, list] = {"direct": [], "serve": [], "serve outside the stages": []}
    for _ in range(n):
        times["direct"].append(direct())
        total, outside = served()
        times["serve"].append(total)
        times["serve outside the stages"].append(outside)
    from ray import serve

    serve.shutdown()
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99)} for k, v in times.items()}


def cmd_bench_serve(args) -> int:
    res = bench_serve(args.n, args.size, args.weights)
    for k, v in res.items():
        print(f"{k:26s} p50 {v['p50'] * 1e3:8.1f} ms  p99 {v['p99'] * 1e3:8.1f} ms")
    print(
        f"Serve adds {(res['serve']['p50'] - res['direct']['p50']) * 1e3:+.1f} ms at p50 (served minus direct, "
        f"interleaved); {res['serve outside the stages']['p50'] * 1e3:.1f} ms of a request is outside the stages"
    )
    return 0


def cmd_bench(args) -> int:
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions

    model = ModelOptions(args.preset, args.weights)
    cases = [(f"{args.n} × {args.size}²", args.n, args.size)] + ([(f"1 × {args.large}²", 1, args.large)]
                                                               if args.large else [])  # fmt: skip
    for label, n, size in cases:
        res = bench_pipeline(n, size, model, UpscaleOptions(), args.diffuse_actors)
        for name in ("loop", "ray"):
            r = res[name]
            print(f"{label:12s} {name:4s}: first run {r['first_s']:6.1f}s, warm run {r['warm_s']:6.1f}s "
                  f"({r['warm_ips']:.2f} img/s)")  # fmt: skip
        print(f"{label:12s} ray/loop warm throughput: {res['ratio_warm']:.2f}x")
    return 0
