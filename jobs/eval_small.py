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
from pipeline.quality import (
    HOLDOUT,
    bicubic_up,
    center_crop,
    grid_ratio,
    load_photo,
    make_lq,
    psnr_y,
    quantize,
    ssim_y,
)
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
    ensemble = graph.workflow.resolved.ensemble > 0
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


# --- choosing the CPU defaults: the fastest settings whose output matches the model at its trained tile ----------

SWEEP_MIN_DB = 45.0  # PSNR (8-bit RGB, whole image) against the reference output a candidate must keep
SWEEP_GRID_SLACK = 0.02  # how much more visible the patch grid may be than in the reference (grid ratio)
SWEEP_MIN_GAIN = 0.05  # a setting replaces the best so far only when this much faster (one run's noise here)


def _psnr_rgb(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two images as 8-bit RGB files hold them (every channel, the whole image)."""
    mse = float(((quantize(a) - quantize(b)) * 127.5).pow(2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class _Setting:
    """The graph of one setting (tile, tiles per call, threads), run with its tiles per call and threads set."""

    def __init__(self, weights, setting: dict):
        self.setting = setting
        self.graph = StageGraph(ModelOptions(weights=weights), UpscaleOptions(tile=setting["tile"]))
        self.stages = self.graph.build_all()

    def run(self, name: str, data: bytes) -> tuple[torch.Tensor, float]:
        import pipeline.stages.diffuse as diffuse

        torch.set_num_threads(self.setting["threads"])
        before, diffuse.CPU_TILES_PER_CALL = diffuse.CPU_TILES_PER_CALL, self.setting["calls"]
        try:
            t0 = time.perf_counter()
            row = next(self.graph.run_local([{"key": name, "bytes": data}], self.stages))
            seconds = time.perf_counter() - t0
        finally:
            diffuse.CPU_TILES_PER_CALL = before
        if row.get("status") != "ok":
            raise RuntimeError(f"{name}: {row.get('error')}")
        return _from_png(row["output"]), seconds


def sweep(weights: str | None, tiles, calls, threads, runs: int = 3, size: int = 256, show=print) -> dict:
    """The fastest CPU settings at equal quality, found one knob at a time: the tile side first, then tiles per
    network call at that tile, then the thread count. The reference is the model at the tile it was trained at
    (the preset's envelope), `calls[0]` tiles a call and `threads[0]` threads; a candidate passes when every output
    (the held-out crops and a 256² -> 1024² photo, which needs several tiles at every tile side tried) keeps PSNR
    >= SWEEP_MIN_DB against the reference's and its patch grid is no more visible (grid ratio within
    SWEEP_GRID_SLACK). Speed: the 1024² upscale timed `runs` times (median), each candidate run alternating with the
    reference (the ratio of the two medians is reported beside it); a candidate replaces the best so far only when it
    is SWEEP_MIN_GAIN faster, so that settings within one run's noise keep the earlier choice."""
    from pipeline.model.presets import PRESETS

    trained = PRESETS["small"].envelope[1]
    inputs = {n: _to_png(make_lq(center_crop(load_photo(n), size)[None])[0]) for n in HOLDOUT}
    inputs["retina"] = _to_png(make_lq(center_crop(load_photo("retina"), 1024)[None])[0])
    lqs = {n: _from_png(b) for n, b in inputs.items()}
    mpx = 1024 * 1024 / 1e6
    ref = _Setting(weights, {"tile": trained, "calls": calls[0], "threads": threads[0]})
    ref_out = {n: ref.run(n, b)[0] for n, b in inputs.items()}
    grid_ref = max(grid_ratio(ref_out[n], lqs[n], 8) for n in inputs)
    rows = []

    def measure(setting: dict) -> dict:
        cand = _Setting(weights, setting) if setting != ref.setting else ref
        outs = {n: cand.run(n, b)[0] for n, b in inputs.items()}
        t_ref, t_cand = [], []
        for _ in range(runs):
            t_ref.append(ref.run("t", inputs["retina"])[1])
            t_cand.append(cand.run("t", inputs["retina"])[1])
        r = {**setting, "s_per_mpx": statistics.median(t_cand) / mpx,
             "reference_s_per_mpx": statistics.median(t_ref) / mpx,
             "speedup": statistics.median(t_ref) / statistics.median(t_cand),
             "min_psnr_db": min(_psnr_rgb(outs[n], ref_out[n]) for n in inputs),
             "grid_ratio": max(grid_ratio(outs[n], lqs[n], 8) for n in inputs)}  # fmt: skip
        r["passes"] = r["min_psnr_db"] >= SWEEP_MIN_DB and r["grid_ratio"] <= grid_ref + SWEEP_GRID_SLACK
        rows.append(r)
        show(f"tile {r['tile']:5d}  calls {r['calls']:2d}  threads {r['threads']:2d}  {r['s_per_mpx']:7.2f} s/Mpx  "
             f"(reference {r['reference_s_per_mpx']:.2f})  x{r['speedup']:.2f}  PSNR vs reference "
             f"{r['min_psnr_db']:6.1f} dB  grid {r['grid_ratio']:.3f}  {'ok' if r['passes'] else 'fails'}")  # fmt: skip
        return r

    best = measure(dict(ref.setting))
    for knob, values in (("tile", tiles), ("calls", calls), ("threads", threads)):
        for v in values:
            setting = {**{k: best[k] for k in ("tile", "calls", "threads")}, knob: v}
            if any(all(r[k] == setting[k] for k in setting) for r in rows):
                continue
            r = measure(setting)
            if r["passes"] and r["s_per_mpx"] < best["s_per_mpx"] * (1 - SWEEP_MIN_GAIN):
                best = r
    return {"reference": rows[0], "rows": rows, "best": best, "grid_ratio_reference": grid_ref}


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"pidray eval-small: {flag} takes positive integers separated by commas, got {text!r}")
    return values


def _main_sweep(args) -> int:
    import pipeline.stages.diffuse as diffuse
    from pipeline.model.presets import PRESETS

    preset = PRESETS["small"]
    tiles = _ints(args.tiles, "--tiles")
    calls = [diffuse.CPU_TILES_PER_CALL] + [c for c in _ints(args.calls, "--calls") if c != diffuse.CPU_TILES_PER_CALL]
    cores = torch.get_num_threads()
    threads = [cores] + [t for t in _ints(args.threads, "--threads") if t != cores]
    print(f"== sweep: reference = tile {preset.envelope[1]} (trained), {calls[0]} tiles a call, {cores} threads; "
          f"a setting passes at PSNR >= {SWEEP_MIN_DB:g} dB against it and no more visible patch grid")  # fmt: skip
    res = sweep(args.weights, tiles, calls, threads, runs=args.runs, size=args.size)
    b, d = res["best"], preset.default_tile or preset.envelope[1]
    print(f"fastest that passes: tile {b['tile']}, {b['calls']} tiles a call, {b['threads']} threads: "
          f"{b['s_per_mpx']:.2f} s/Mpx, x{b['speedup']:.2f} the reference (today's defaults: tile {d}, "
          f"{calls[0]} tiles a call, {cores} threads)")  # fmt: skip
    if args.report:
        Path(args.report).mkdir(parents=True, exist_ok=True)
        (Path(args.report) / "sweep.json").write_text(json.dumps(res, indent=1))
        print(f"report: {args.report}/sweep.json")
    return 0


def main(args) -> int:
    """One run: the model (and, with --compare, another one: e.g. the previous bundled model), side by side; or,
    with --sweep, the CPU settings search."""
    if getattr(args, "sweep", False):
        return _main_sweep(args)
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
