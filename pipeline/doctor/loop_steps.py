"""The pipeline steps: the diffuse stage's real sampler loop, golden parity on the device, the stage graph."""

from __future__ import annotations

import math
import statistics
import time

import torch

from pipeline.doctor.common import build_net, sync
from pipeline.doctor.harness import Check, Skipped
from pipeline.doctor.plan import loop_batches


def _doctor_preset(c: Check):
    """The preset the loop runs: flux-2k (random weights) on a GPU; the same layout with the tiny config in a smoke."""
    import dataclasses

    from pipeline.model.presets import get_preset

    p = get_preset("flux-2k")
    if c.smoke:
        p = dataclasses.replace(p, config=c.cfg, envelope=(c.sizes[0], c.sizes[0]), text_encoder="none")
    return p


def step_diffuse_loop(c: Check, put) -> None:
    """The diffuse stage's real sampler (x, x0, noise on the device; 4 steps) at 1 and 2 (--full: and 4) tiles per
    network call, an image of 2×2 tiles with fusion (the tiled 4K case at 2048² tiles), and at one tile a call with
    FP8 matmuls and with torch.compile (--full: FP8 tiled too).
    Every (batch, tile shape) is warmed before it is timed; the median of `--reps` runs is reported. The host's
    share of a step = 1 - (time in the network's forward) / (time of the whole step)."""
    from pipeline.stages.diffuse import DiffuseItem, DiffuseStage
    from pipeline.tiling import TilePlan

    preset, cfg, dev = _doctor_preset(c), c.cfg, c.device
    size = c.sizes[0]
    lat, unit = size // cfg.latent_factor, cfg.latent_spatial_down_factor  # latent_factor: output px per latent px
    one = TilePlan((lat * unit,) * 2, unit, cfg.latent_factor, cfg.sr_scale, (lat, lat), (lat, lat), (1, 1))
    ov = max(1, lat // 16)  # 2×2 tiles overlapping by 1/16 of a tile: 128 px at 2048² (3968² for 4K)
    four = TilePlan(((2 * lat - ov) * unit,) * 2, unit, cfg.latent_factor, cfg.sr_scale, (lat, lat),
                    (lat - ov, lat - ov), (2, 2))  # fmt: skip
    chans = cfg.lq_latent_channels or cfg.lq_in_channels
    y = torch.zeros(cfg.txt_max_length, cfg.txt_embed_dim)
    backend = "triton" if dev.type == "cuda" else "torch"
    nets: dict = {}

    def net_of(key):  # built on first use: a network that fails to build fails its own items only
        if key not in nets:
            if key == "compile ":
                net = build_net(cfg, dev, c.dtype, "torch")
                net.compile()
            else:
                net = build_net(cfg, dev, c.dtype, backend)
                if key == "fp8 ":
                    from pipeline.kernels.fp8 import quantize_fp8

                    quantize_fp8(net)
            nets[key] = net
        return nets[key]

    variants = [""] + (["fp8 "] if c.fp8 else []) + (["compile "] if c.compile else [])
    cases = [("", f"{size}² batch {b}", one, b) for b in loop_batches(c.full)]
    cases.append(("", f"tiled 2x2 of {size}² (fusion) per image", four, 1))
    cases += [(k, f"{k}{size}² batch 1", one, 1) for k in variants if k]
    if c.full:  # compiled, the tiled case would be a second graph (4 tiles a call): another compile, same finding
        cases += [(k, f"{k}tiled 2x2 of {size}²", four, 1) for k in variants if k and k != "compile "]

    def run_case(key, plan, batch):
        net = net_of(key)
        stage = DiffuseStage(loaded=(preset, net), memory_budget=1 << 40)
        lh, lw = plan.lat_hw
        items = [DiffuseItem(torch.randn(chans, lh, lw), y, plan, i, 0.1, 4) for i in range(batch)]
        t0 = time.perf_counter()
        stage.diffuse_many(items, steps=1)  # warm this (batch, shape): kernels compiled, autotuned, graphs built
        sync(dev)
        warm_s = time.perf_counter() - t0
        walls, shares = [], []
        for _ in range(c.reps):
            wall, fwd = _timed_run(stage, net, items, dev)
            walls.append(wall)
            shares.append(1 - fwd / wall)
        wall = statistics.median(walls)
        return {"s_per_image": wall / batch, "tiles_per_s": batch * plan.n_tiles / wall,
                "host_share": statistics.median(shares), "warm_s": round(warm_s, 2), "reps": c.reps}  # fmt: skip

    for key, label, plan, batch in cases:
        res = c.item(put, label, lambda key=key, plan=plan, batch=batch: run_case(key, plan, batch))
        if res is not None:
            put(label, res)


class _Timed:
    """The network with every call timed (synchronised): a proxy, so a compiled network's graph is left alone."""

    def __init__(self, net, dev):
        self._net, self._dev, self.seconds = net, dev, 0.0

    def __getattr__(self, name):
        return getattr(self._net, name)

    def __call__(self, *a, **kw):
        sync(self._dev)
        t0 = time.perf_counter()
        out = self._net(*a, **kw)
        sync(self._dev)
        self.seconds += time.perf_counter() - t0
        return out


def _timed_run(stage, net, items, dev) -> tuple[float, float]:
    """(wall seconds, seconds inside the network's forward) of one 4-step diffuse of items."""
    stage.net = timed = _Timed(net, dev)
    try:
        sync(dev)
        t0 = time.perf_counter()
        stage.diffuse_many(items, steps=4)
        sync(dev)
        return time.perf_counter() - t0, timed.seconds
    finally:
        stage.net = net


def step_golden(c: Check, put) -> None:
    """The parity fixtures with the networks on the device, one item per fixture. Fixtures asked for with --golden
    that are not there fail the step; with none found in a source checkout's places it is skipped, and says so."""
    from pipeline.golden import verify

    files = c.golden_files()  # raises for an empty or missing --golden DIR
    if not files:
        from pipeline.doctor.harness import golden_places

        raise Skipped(f"no golden fixtures found (looked in {', '.join(map(str, golden_places()))}; pass --golden DIR)")
    put("folder", str(files[0].parent))
    if c.device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # parity in fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False

    def one(f):
        rep = verify(f, device=c.device)
        put(f.name, {"kind": rep.kind, "ok": rep.ok,
                     **{ch.name: ch.error if ch.error is not None else ch.note for ch in rep.checks},
                     **{f"{ch.name} tolerance": ch.tolerance for ch in rep.checks},
                     **({"problem": rep.problem} if rep.problem else {})})  # fmt: skip
        if not rep.ok:
            c.report.data.setdefault("failures", []).append(f"golden {f.name}: {rep.problem or 'out of tolerance'}")

    for f in files:
        c.item(put, f.name, lambda f=f: one(f))


def step_graph(c: Check, put) -> None:
    """The bundled small model through the stage graph on the device and on the CPU: the same image."""
    import io

    import numpy as np
    from PIL import Image

    side = 24 if c.smoke else 96
    arr = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    c.item(put, f"small {side}² -> {side * 4}²", lambda: _graph(c, put, side, buf.getvalue()))


def _graph(c: Check, put, side: int, data: bytes) -> None:
    import io

    import numpy as np
    from PIL import Image

    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    outs, times = {}, {}
    for dev in dict.fromkeys([str(c.device), "cpu"]):
        graph = StageGraph(ModelOptions(preset="small", device=dev, dtype="fp32"))
        stages = graph.build_all()
        next(graph.run_local([{"key": "w", "bytes": data}], stages))  # warm
        t0 = time.perf_counter()
        row = next(graph.run_local([{"key": "x", "bytes": data}], stages))
        times[dev] = time.perf_counter() - t0
        if row.get("status") != "ok":
            raise RuntimeError(f"the small preset failed on {dev}: {row.get('error')}")
        outs[dev] = np.asarray(Image.open(io.BytesIO(row["output"])).convert("RGB"), dtype=np.float64)
    mse = float(((outs[str(c.device)] - outs["cpu"]) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
    put(f"small {side}² -> {side * 4}²", {"seconds": times, "psnr_device_vs_cpu_db": psnr})
    if psnr < 40:
        c.report.data.setdefault("failures", []).append(f"small preset on {c.device} vs CPU: {psnr:.1f} dB")
