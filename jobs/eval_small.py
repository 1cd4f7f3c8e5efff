"""`pidray eval-small`: the bundled small model vs bicubic on held-out photos, through the real stage graph.

For each held-out photo: centre crop (--size) -> antialiased bicubic ÷4, 8-bit PNG (the LQ input) ->
`pidray` 4× with the default sampler and seed -> PSNR on Y (BT.601, 4-pixel border shaved) and SSIM
against the crop, beside bicubic 4× of the same LQ. Also times a 256×256 -> 1024×1024 upscale and
writes side-by-side PNGs (nearest LQ | bicubic | pidray | original).
"""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.graph import StageGraph
from pipeline.quality import HOLDOUT, bicubic_up, center_crop, load_photo, make_lq, psnr_y, ssim_y
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions


def _to_png(x: torch.Tensor) -> bytes:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _from_png(data: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)


def evaluate(weights: str | None, size: int, runs: int, report: str | None, names=HOLDOUT) -> dict:
    graph = StageGraph(ModelOptions(weights=weights), UpscaleOptions())
    stages = graph.build_all()
    rows, panels = [], []
    for name in names:
        hq = center_crop(load_photo(name), size)
        lq = make_lq(hq[None])[0]
        out_row = next(graph.run_local([{"key": name, "bytes": _to_png(lq)}], stages))
        if out_row.get("status") != "ok":
            raise RuntimeError(f"{name}: {out_row.get('error')}")
        out = _from_png(out_row["output"])
        bic = bicubic_up(lq[None])[0]
        rows.append(
            {"image": name, "psnr_y_model": psnr_y(out, hq), "psnr_y_bicubic": psnr_y(bic, hq),
             "ssim_model": ssim_y(out, hq), "ssim_bicubic": ssim_y(bic, hq)}
        )  # fmt: skip
        nearest = torch.nn.functional.interpolate(lq[None], scale_factor=4, mode="nearest")[0]
        panels.append(torch.cat([nearest, bic, out, hq], dim=2))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    mean["psnr_gain_db"] = mean["psnr_y_model"] - mean["psnr_y_bicubic"]

    lq256 = center_crop(load_photo("retina"), 1024)  # any 1024² photo: this only times the upscale
    data = _to_png(make_lq(lq256[None])[0])
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        next(graph.run_local([{"key": "t", "bytes": data}], stages))
        times.append(time.perf_counter() - t0)
    res = {"rows": rows, "mean": mean, "runtime_256_to_1024_s": {"median": statistics.median(times), "runs": times}}
    if report:
        out_dir = Path(report)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(res, indent=1))
        for name, panel in zip(names, panels):
            (out_dir / f"side_by_side_{name}.png").write_bytes(_to_png(panel))
    return res


def main(args) -> int:
    res = evaluate(args.weights, args.size, args.runs, args.report)
    print(f"{'image':12s} {'PSNR-Y pidray':>14s} {'PSNR-Y bicubic':>15s} {'SSIM pidray':>12s} {'SSIM bicubic':>13s}")
    for r in res["rows"]:
        print(f"{r['image']:12s} {r['psnr_y_model']:14.2f} {r['psnr_y_bicubic']:15.2f} {r['ssim_model']:12.4f} "
              f"{r['ssim_bicubic']:13.4f}")  # fmt: skip
    m = res["mean"]
    print(f"{'mean':12s} {m['psnr_y_model']:14.2f} {m['psnr_y_bicubic']:15.2f} {m['ssim_model']:12.4f} "
          f"{m['ssim_bicubic']:13.4f}   gain {m['psnr_gain_db']:+.2f} dB")  # fmt: skip
    rt = res["runtime_256_to_1024_s"]
    print(f"256x256 -> 1024x1024 on {torch.get_num_threads()} CPU threads: median {rt['median']:.2f}s "
          f"over {len(rt['runs'])} runs")  # fmt: skip
    if args.report:
        print(f"report: {args.report}/eval.json and side_by_side_*.png (nearest LQ | bicubic | pidray | original)")
    return 0
