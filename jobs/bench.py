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
    p = sub.add_parser("bench", help="benchmarks: `pipeline` (Ray Data vs plain loop)")
    p.add_argument("what", choices=["pipeline"])
    p.add_argument("-n", type=int, default=24, help="images")
    p.add_argument("--size", type=int, default=64, help="input side in pixels")
    p.add_argument("--preset", default="small")
    p.add_argument("--weights", default=None)
    p.add_argument("--diffuse-actors", type=int, default=None)
    p.set_defaults(fn=cmd_bench)


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
