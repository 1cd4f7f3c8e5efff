"""`pidray bench pipeline`: the Ray Data job vs a plain in-process loop over the same stages and model.

Both runs read the same N files from a folder and write to one. Throughput is reported in total
(start-up included) and warm (from the first finished image to the last: model loaded, pool busy).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from jobs.pipeline import JobConfig, run_job
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions


def _make_inputs(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from pipeline.quality import load_photos

    photos = load_photos(min_size=size)
    for i in range(n):
        img = photos[i % len(photos)]
        top = (i * 37) % (img.shape[1] - size + 1)
        arr = ((img[:, top : top + size, :size] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"img_{i:04d}.png")


def _timed_run(cfg: JobConfig) -> dict:
    stamps: list[float] = []
    t0 = time.perf_counter()
    summary = run_job(cfg, on_row=lambda row: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    n = summary.ok
    warm = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else float("nan")
    return {"ok": n, "failed": summary.failed, "total_s": total, "total_ips": n / total, "warm_ips": warm}


def bench_pipeline(n: int, size: int, model: ModelOptions, options: UpscaleOptions, actors: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        _make_inputs(src, n, size)
        base = dict(src=str(src), model=model, options=options, progress=False)
        loop = _timed_run(JobConfig(dst=str(Path(tmp) / "loop"), local=True, **base))
        conc = {"diffuse": actors} if actors else {}
        ray = _timed_run(JobConfig(dst=str(Path(tmp) / "ray"), concurrency=conc, **base))
    return {"loop": loop, "ray": ray, "ratio_warm": ray["warm_ips"] / loop["warm_ips"],
            "ratio_total": ray["total_ips"] / loop["total_ips"]}  # fmt: skip


def add_bench_parser(sub) -> None:
    from jobs import bench_gpu

    p = sub.add_parser("bench", help="benchmarks: pipeline (Ray Data vs loop), serve (latency), kernels (GPU)")
    bsub = p.add_subparsers(dest="what", required=True)
    q = bsub.add_parser("pipeline", help="Ray Data job vs a plain in-process loop over the same stages")
    q.add_argument("-n", type=int, default=24, help="images")
    q.add_argument("--size", type=int, default=64, help="input side in pixels")
    q.add_argument("--preset", default="small")
    q.add_argument("--weights", default=None)
    q.add_argument("--diffuse-actors", type=int, default=None)
    q.set_defaults(fn=cmd_bench)
    q = bsub.add_parser("serve", help="Serve p50/p99 latency vs a direct in-process call of the same graph")
    q.add_argument("-n", type=int, default=30, help="sequential requests")
    q.add_argument("--size", type=int, default=32, help="input side in pixels")
    q.add_argument("--weights", default=None)
    q.set_defaults(fn=cmd_bench_serve)
    q = bsub.add_parser("kernels", help="Triton kernels and the whole forward at 2048²/3840² (needs a GPU)")
    bench_gpu.add_args(q)
    q.set_defaults(fn=bench_gpu.cmd)


def bench_serve(n: int, size: int, weights: str | None) -> dict:
    import io
    import socket

    import numpy as np
    import requests
    from PIL import Image

    from pipeline.graph import StageGraph
    from serve.run import start

    arr = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    graph = StageGraph(ModelOptions(weights=weights), UpscaleOptions())
    stages = graph.build_all()
    direct = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(graph.run_local([{"key": "b", "bytes": data}], stages))
        direct.append(time.perf_counter() - t0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start({"preset": "small", "weights": weights}, port=port)
    deadline = time.time() + 300
    while time.time() < deadline and requests.get(url + "/healthz", timeout=10).status_code != 200:
        time.sleep(1)
    for _ in range(3):  # warm the replicas
        requests.post(url + "/v1/upscale", data=data, timeout=120)
    served = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = requests.post(url + "/v1/upscale", data=data, timeout=120)
        served.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    from ray import serve

    serve.shutdown()
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {k: {"p50": pct(v, 0.5), "p99": pct(v, 0.99)} for k, v in (("direct", direct), ("serve", served))}


def cmd_bench_serve(args) -> int:
    res = bench_serve(args.n, args.size, args.weights)
    for k, v in res.items():
        print(f"{k:6s} p50 {v['p50'] * 1e3:8.1f} ms  p99 {v['p99'] * 1e3:8.1f} ms")
    print(f"Serve adds {(res['serve']['p50'] - res['direct']['p50']) * 1e3:+.1f} ms at p50")
    return 0


def cmd_bench(args) -> int:
    res = bench_pipeline(
        args.n, args.size, ModelOptions(args.preset, args.weights), UpscaleOptions(), args.diffuse_actors
    )
    for name in ("loop", "ray"):
        r = res[name]
        print(f"{name:5s} {r['ok']} images in {r['total_s']:.1f}s: {r['total_ips']:.2f} img/s total, "
              f"{r['warm_ips']:.2f} img/s warm")  # fmt: skip
    print(f"ray/loop throughput ratio: warm {res['ratio_warm']:.2f}x, total {res['ratio_total']:.2f}x")
    return 0
