"""`pidray eval-small`: the bundled small model vs bicubic on held-out photos, through the real stage graph.

For each held-out photo: centre crop (--size) -> antialiased bicubic ÷4, 8-bit PNG (the LQ input) ->
`pidray` 4× with the default sampler and seed -> PSNR on Y (BT.601, 4-pixel border shaved) and SSIM
against the crop, beside bicubic 4× of the same LQ. Also times a 256×256 -> 1024×1024 upscale and
writes side-by-side PNGs (nearest LQ | bicubic | pidray | original). Also the grid ratio (how visible the network's
patch grid is: `pipeline.quality.grid_ratio`) and CPU seconds per output megapixel; `--compare OTHER` evaluates a
second model in the same run.
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
from pipeline.quality import HOLDOUT, bicubic_up, center_crop, grid_ratio, load_photo, make_lq, psnr_y, ssim_y
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.stages.common import ensemble_shift


def _to_png(x: torch.Tensor) -> bytes:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _from_png(data: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)


ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets"
PREVIOUS = ASSETS / "previous" / "pidray_small_sr4x_v1.safetensors"  # the first bundled model (not in the wheel)


def shipped_settings(weights: str | None) -> tuple[int, bool | None]:
    """(sampler steps, ensemble) a small model is run with as shipped: a file that names its `sampler_steps` (the
    second version on) runs those steps with the preset's ensemble; the first version ran 4 steps, no ensemble."""
    from pipeline.model.loading import file_metadata
    from pipeline.model.presets import PRESETS
    from pipeline.runtime import net_path

    meta = file_metadata(net_path(ModelOptions(weights=weights), PRESETS["small"]))
    if "sampler_steps" in meta:
        return int(meta["sampler_steps"]), None
    return 4, False


def evaluate(
    weights: str | None, size: int, runs: int, report: str | None, names=HOLDOUT, steps: int | None = None
) -> dict:
    shipped_steps, shipped_ensemble = shipped_settings(weights)
    steps = steps or shipped_steps
    graph = StageGraph(ModelOptions(weights=weights), UpscaleOptions(steps=steps, ensemble=shipped_ensemble))
    ensemble = ensemble_shift(graph.preset, graph.options) > 0
    stages = graph.build_all()
    rows, panels = [], []
    p = graph.preset.config.patch_size
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
             "ssim_model": ssim_y(out, hq), "ssim_bicubic": ssim_y(bic, hq),
             "grid_ratio": grid_ratio(out, lq, p), "grid_ratio_half": grid_ratio(out, lq, p, offset=p // 2)}
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
    med = statistics.median(times)
    res = {"steps": steps, "ensemble": ensemble, "rows": rows, "mean": mean,
           "runtime_256_to_1024_s": {"median": med, "runs": times},
           "cpu_s_per_output_mpx": med / (1024 * 1024 / 1e6), "threads": torch.get_num_threads()}  # fmt: skip
    if report:
        out_dir = Path(report)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval.json").write_text(json.dumps(res, indent=1))
        for name, panel in zip(names, panels):
            (out_dir / f"side_by_side_{name}.png").write_bytes(_to_png(panel))
    return res


def _print(label: str, res: dict) -> None:
    print(f"== {label} ({res['steps']} sampler steps, shifted-grid ensemble {'on' if res['ensemble'] else 'off'})")
    print(f"{'image':12s} {'PSNR-Y model':>13s} {'PSNR-Y bicubic':>15s} {'SSIM model':>11s} {'SSIM bicubic':>13s} "
          f"{'grid ratio':>11s} {'(half-patch)':>12s}")  # fmt: skip
    for r in res["rows"]:
        print(f"{r['image']:12s} {r['psnr_y_model']:13.2f} {r['psnr_y_bicubic']:15.2f} {r['ssim_model']:11.4f} "
              f"{r['ssim_bicubic']:13.4f} {r['grid_ratio']:11.3f} {r['grid_ratio_half']:12.3f}")  # fmt: skip
    m = res["mean"]
    print(f"{'mean':12s} {m['psnr_y_model']:13.2f} {m['psnr_y_bicubic']:15.2f} {m['ssim_model']:11.4f} "
          f"{m['ssim_bicubic']:13.4f} {m['grid_ratio']:11.3f} {m['grid_ratio_half']:12.3f}   "
          f"gain {m['psnr_gain_db']:+.2f} dB")  # fmt: skip
    rt = res["runtime_256_to_1024_s"]
    print(f"256x256 -> 1024x1024 on {res['threads']} CPU threads: median {rt['median']:.2f}s over {len(rt['runs'])} "
          f"runs = {res['cpu_s_per_output_mpx']:.2f} s per output Mpx")  # fmt: skip


def main(args) -> int:
    """One run: the model (and, with --compare, another one: e.g. the previous bundled model), side by side."""
    runs = [("model " + (args.weights or "bundled"), args.weights)]
    if getattr(args, "compare", None):
        other = str(PREVIOUS) if args.compare == "previous" else args.compare
        if not Path(other).is_file():
            print(f"pidray eval-small: --compare {args.compare}: no such file ({other})")
            return 2
        runs.append(("compare " + args.compare, other))
    results = []
    for i, (label, weights) in enumerate(runs):
        report = args.report if i == 0 else (f"{args.report}/compare" if args.report else None)
        res = evaluate(weights, args.size, args.runs, report, steps=getattr(args, "steps", None))
        results.append((label, res))
        _print(label, res)
    if len(results) == 2:
        (_, a), (_, b) = results
        print(f"== side by side: PSNR gain {a['mean']['psnr_gain_db']:+.2f} vs {b['mean']['psnr_gain_db']:+.2f} dB, "
              f"SSIM {a['mean']['ssim_model']:.4f} vs {b['mean']['ssim_model']:.4f}, grid ratio "
              f"{a['mean']['grid_ratio']:.3f} vs {b['mean']['grid_ratio']:.3f}, CPU "
              f"{a['cpu_s_per_output_mpx']:.2f} vs {b['cpu_s_per_output_mpx']:.2f} s/Mpx")  # fmt: skip
    if args.report:
        print(f"report: {args.report}/eval.json and side_by_side_*.png (nearest LQ | bicubic | model | original)")
    return 0
