"""The device check: `pidray doctor --gpu`, or `python -m pipeline.doctor` where only pipeline/ and torch exist.

GPU machines are lent for minutes, have no package registry, and have torch + triton but no Ray, boto3 or FastAPI:
this module imports nothing outside `pipeline/` and the standard library besides torch (triton where present). It
runs a fixed list of steps, each guarded (an error is recorded and the next step runs) and each checked against the
time budget before it starts and between its items; the report (`doctor.json` + `doctor.md` in `--out`) is
rewritten after every item, so a run cut short still leaves everything it measured.

Steps: `versions` (torch/triton/CUDA, the card, which SDPA backends run at our attention shapes); `kernels` (every
Triton kernel vs its torch reference on the device, fp32 and bf16, odd sizes, offsets past 2^31 elements, and
speed at the network's shapes); `forward` (the released flux-2k network with random weights at 2048² and 3840²:
eager vs our kernels vs torch.compile — agreement, ms, peak memory vs `memory.py`, MFU); `diffuse_loop` (the real
4-step sampler of the diffuse stage at 1/2/4 tiles per call: tiles/s and the host's share of a step); `golden` (the
parity fixtures with the networks on the device); `graph` (the bundled `small` preset through the stage graph on
the device vs the CPU); `precision` (bf16 weights vs fp32 weights under bf16 autocast, both against fp32, on the
golden fixtures and the full-depth network). `--smoke` runs every step on the CPU with a tiny config in seconds
(a test does, with Ray, boto3 and FastAPI made unimportable). FLOPs are counted analytically (`forward_flops`):
2·M·N·K per matmul and 4·N²·d per attention; element-wise work is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def forward_flops(cfg, H: int, W: int, text_len: int) -> float:
    p, D = cfg.patch_size, cfg.hidden_size
    L, T, HW = (H // p) * (W // p), text_len, H * W
    F = int(2 * int(4 * D) / 3)
    mm = lambda m, n, k: 2.0 * m * n * k  # noqa: E731
    f = mm(L, D, 3 * p * p) + mm(1, D, 256) + mm(1, D, D) + mm(T, D, cfg.txt_embed_dim)
    per_patch = (
        mm(L + T, 3 * D, D) + 4.0 * (L + T) ** 2 * D + mm(L + T, D, D) + 3 * mm(L + T, F, D) + 2 * mm(1, 6 * D, D)
    )
    f += cfg.patch_depth * per_patch
    hid, ad, P2, d = cfg.lq_hidden_dim, cfg.pixel_attn_dim, p * p, cfg.pixel_hidden_size
    z_in = cfg.lq_latent_channels // cfg.lq_latent_unpatchify_factor**2
    f += mm(L, hid, 9 * z_in) + mm(L, hid, 9 * hid) + cfg.lq_num_res_blocks * 2 * mm(L, hid, 9 * hid)
    gate_out = D if cfg.lq_gate_type.endswith("per_dim") else 1
    f += cfg.num_lq_outputs * (mm(L, D, hid) + mm(L, gate_out, 2 * D))
    per_pixel = (mm(L, 6 * d * P2, D) + 2 * mm(L, ad, P2 * d) + mm(L, 3 * ad, ad) + 4.0 * L * L * ad + mm(L, ad, ad)
                 + 2 * mm(HW, 4 * d, d))  # fmt: skip
    f += cfg.pixel_depth * per_pixel + mm(HW, 3, d)
    return f


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    dev = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_cases(cfg, H: int, W: int, device, dtype):
    """(name, ours, eager) closures at the shapes the network runs for an H × W output."""
    from pipeline.kernels import reference as ref
    from pipeline.kernels.gated_residual import gated_residual
    from pipeline.kernels.pit_mlp import pit_mlp
    from pipeline.kernels.qk_norm_rope import qk_norm_rope
    from pipeline.kernels.rms_norm_modulate import rms_norm_modulate
    from pipeline.kernels.tile_blend import tile_blend
    from pipeline.model.math import rope_2d

    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    p, D, d = cfg.patch_size, cfg.hidden_size, cfg.pixel_hidden_size
    gh, gw = H // p, W // p
    L, P2 = gh * gw, p * p
    x_tok, mod_tok, w_tok = rnd(1, L, D), rnd(1, 1, 6 * D), rnd(D)
    sh_t, sc_t, g_t = mod_tok.chunk(6, -1)[:3]
    x_pix, mod_pix, w_pix = rnd(L, P2, d), rnd(L, P2, 6 * d), rnd(d)
    s1, c1, g1, s2, c2, g2 = mod_pix.chunk(6, -1)
    y_tok, y_pix = rnd(1, L, D), rnd(L, P2, d)
    fc1w, fc1b, fc2w, fc2b = rnd(4 * d, d), rnd(4 * d), rnd(d, 4 * d), rnd(d)
    hd = D // cfg.num_groups
    qkv = rnd(1, L, 3 * D)
    q, k, _ = qkv.view(1, L, 3, cfg.num_groups, hd).unbind(2)
    wq, wk = rnd(hd), rnd(hd)
    rope = tuple(r.to(device) for r in rope_2d(hd, gh, gw))
    n, ov = 3, min(256, H // 4)  # a 3 × 3 grid of tiles with 256-pixel overlaps
    tiles = rnd(n * n, 3, H, W).float()
    wy = torch.rand(n * n, H, device=device) + 0.1
    wx = torch.rand(n * n, W, device=device) + 0.1
    origins = torch.tensor([(i * (H - ov), j * (W - ov)) for i in range(n) for j in range(n)], device=device)
    canvas = (n * (H - ov) + ov, n * (W - ov) + ov)
    return [
        ("norm_modulate per-token", lambda: rms_norm_modulate(x_tok, w_tok, sh_t, sc_t),
         lambda: ref.norm_modulate(x_tok, w_tok, sh_t, sc_t)),
        ("norm_modulate per-pixel", lambda: rms_norm_modulate(x_pix, w_pix, s1, c1),
         lambda: ref.norm_modulate(x_pix, w_pix, s1, c1)),
        ("pit_mlp sub-block", lambda: pit_mlp(x_pix, w_pix, s2, c2, g2, fc1w, fc1b, fc2w, fc2b),
         lambda: ref.pit_mlp(x_pix, w_pix, s2, c2, g2, fc1w, fc1b, fc2w, fc2b)),
        ("gated_residual per-token", lambda: gated_residual(x_tok, g_t, y_tok),
         lambda: ref.gated_residual(x_tok, g_t, y_tok)),
        ("gated_residual per-pixel", lambda: gated_residual(x_pix, g1, y_pix),
         lambda: ref.gated_residual(x_pix, g1, y_pix)),
        ("qk_norm_rope", lambda: qk_norm_rope(q, k, wq, wk, rope), lambda: ref.qk_norm_rope(q, k, wq, wk, rope)),
        ("tile_blend 3x3", lambda: tile_blend(tiles, wy, wx, origins, canvas),
         lambda: ref.tile_blend(tiles, wy, wx, origins, canvas)),
    ]  # fmt: skip


def build_net(cfg, device, dtype, backend: str):
    """A PiD network of `cfg` with random weights (N(0, 0.02)), on `device` in `dtype`, with kernel `backend`."""
    from pipeline.kernels import get_ops
    from pipeline.model.network import PidNet

    torch.manual_seed(0)
    with torch.device(device):
        net = PidNet(cfg, ops=get_ops(backend, device), dtype=dtype)
    with torch.no_grad():
        for prm in net.parameters():
            prm.normal_(0, 0.02)
    return net.eval().requires_grad_(False)


def tiny_config():
    from pipeline.model.config import PidConfig

    return PidConfig(
        hidden_size=64, num_groups=4, pixel_hidden_size=16, pixel_attn_hidden_size=32, pixel_num_groups=2,
        patch_depth=2, pixel_depth=1, txt_embed_dim=32, txt_max_length=8, lq_hidden_dim=16, lq_num_res_blocks=1,
    )  # fmt: skip


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| (inf when shapes differ); the worst pair for tuples of tensors."""
    if isinstance(a, (tuple, list)):
        return max(_rel_err(x, y) for x, y in zip(a, b, strict=True))
    if a.shape != b.shape:
        return float("inf")
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ the report
class Report:
    """Everything measured so far, rewritten to `out/doctor.json` and `out/doctor.md` after every item."""

    def __init__(self, out: Path | None):
        self.out = out
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
        if out:
            out.mkdir(parents=True, exist_ok=True)

    def put(self, step: str, key: str, value) -> None:
        self.data["steps"].setdefault(step, {})[key] = value
        self.flush()

    def flush(self) -> None:
        if not self.out:
            return
        texts = {"doctor.json": json.dumps(self.data, indent=1, default=str), "doctor.md": self.markdown()}
        for name, text in texts.items():
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def markdown(self) -> str:
        lines = [f"# pidray doctor — {self.data.get('device', '?')}", "", f"started {self.data['started']}", ""]
        for step, items in self.data["steps"].items():
            lines += [f"## {step}", ""]
            for k, v in items.items():
                if isinstance(v, dict):
                    v = ", ".join(f"{kk} {_fmt(vv)}" for kk, vv in v.items())
                lines.append(f"- {k}: {_fmt(v)}")
            lines.append("")
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Check:
    """What every step gets: the device, dtype, config, sizes, the time budget, and the report."""

    def __init__(self, args):
        self.smoke = args.smoke
        want = "cpu" if args.smoke else args.device
        self.device = torch.device(want if want != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        default = "32" if args.smoke else "2048,3840" if self.device.type == "cuda" else "256"  # a CPU: no 2K tiles
        self.sizes = [int(s) for s in (args.sizes or default).split(",")]
        self.reps = args.reps if args.reps else (1 if args.smoke else 5)
        self.compile = not args.no_compile and not args.smoke
        self.deadline = time.time() + args.budget
        self.golden = args.golden
        self.report = Report(Path(args.out) if args.out else None)
        self.report.data["device"] = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                                      else f"cpu ({os.cpu_count()} cores)")  # fmt: skip
        if args.smoke:
            self.cfg = tiny_config()
        else:
            from pipeline.model.presets import get_preset

            self.cfg = get_preset("flux-2k").config

    def left(self) -> float:
        return self.deadline - time.time()

    def has(self, seconds: float) -> bool:
        """True when at least `seconds` remain (a smoke run never skips)."""
        return self.smoke or self.left() > seconds


# ------------------------------------------------------------------------------------------------ steps
def step_versions(c: Check, put) -> None:
    put("python", platform.python_version())
    put("torch", torch.__version__)
    try:
        import triton

        put("triton", triton.__version__)
    except ImportError:
        put("triton", "not installed")
    put("device", str(c.device))
    if c.device.type == "cuda":
        p = torch.cuda.get_device_properties(c.device)
        c.report.data["device"] = p.name
        put("card", {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                     "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda})  # fmt: skip
    else:
        c.report.data["device"] = f"cpu ({os.cpu_count()} cores)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, size = c.cfg, c.sizes[0]
    L = (size // cfg.patch_size) ** 2
    heads_p, dim_p = cfg.num_groups, cfg.hidden_size // cfg.num_groups
    heads_x, dim_x = cfg.pixel_num_groups, cfg.pixel_attn_dim // cfg.pixel_num_groups
    for label, (h, d) in (("patch attention", (heads_p, dim_p)), ("pixel attention", (heads_x, dim_x))):
        q = torch.randn(1, h, L + cfg.txt_max_length, d, device=c.device, dtype=c.dtype)
        ref = None
        res = {}
        for be in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.CUDNN_ATTENTION):  # fmt: skip
            try:
                with sdpa_kernel([be]):
                    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
                    ms = _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), c.reps, 1)
                ref = out if ref is None else ref
                res[be.name.lower()] = f"{ms:.3f} ms, rel err {_rel_err(out, ref):.1e}"
            except RuntimeError as e:
                res[be.name.lower()] = f"unavailable ({str(e).splitlines()[0][:80]})"
        put(f"sdpa {label} {h}x{d}, {L} tokens", res)


def _triton_runs(device: torch.device) -> bool:
    """Triton is installed and can run here: on CUDA, or in its interpreter on the CPU (TRITON_INTERPRET=1)."""
    from pipeline.kernels import triton_available

    return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def step_kernels(c: Check, put) -> None:
    if not _triton_runs(c.device):
        put("skipped", "Triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU) and triton installed")
        return
    p = c.cfg.patch_size
    odd = p * (3 if c.smoke else 37)  # an odd number of patches per side: rows that fill no power of two
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        agreement = {}
        for name, ours, eager in kernel_cases(c.cfg, odd, odd + p * 2, c.device, dtype):
            err = _rel_err(ours(), eager())
            agreement[name] = f"{err:.1e} {'ok' if err <= tol else 'FAIL'}"
            put(f"agreement {str(dtype)[6:]}", dict(agreement))
            if err > tol:
                c.report.data.setdefault("failures", []).append(f"kernel {name} {dtype}: rel err {err:.2e}")
    if c.device.type == "cuda" and c.has(60):
        put("offsets past 2^31 elements", _big_offsets(c.device))
    size = c.sizes[0]
    for name, ours, eager in kernel_cases(c.cfg, size, size, c.device, c.dtype):
        if not c.has(20):
            put(f"speed {size}² {name}", "skipped: time budget")
            continue
        t_ours, t_eager = _median_ms(ours, c.reps), _median_ms(eager, c.reps)
        put(f"speed {size}² {name}", {"ours_ms": t_ours, "eager_ms": t_eager, "speedup": t_eager / t_ours})


def _big_offsets(device) -> dict:
    """The row kernels on tensors of more than 2^31 elements: the last rows (offsets past int32) vs the reference."""
    from pipeline.kernels import reference as ref
    from pipeline.kernels.gated_residual import gated_residual
    from pipeline.kernels.rms_norm_modulate import rms_norm_modulate

    D = 1536
    rows = (1 << 31) // D + 64
    out = {}
    try:
        x = torch.randn(rows, D, device=device, dtype=torch.bfloat16)
        y = torch.randn_like(x)
        gate = torch.randn(D, device=device, dtype=torch.bfloat16)
        w, sh, sc = (torch.randn(D, device=device, dtype=torch.bfloat16) for _ in range(3))
        tail = slice(rows - 64, rows)
        got = gated_residual(x, gate, y)[tail]
        out["gated_residual"] = _rel_err(got, ref.gated_residual(x[tail], gate, y[tail]))
        del got
        got = rms_norm_modulate(x, w, sh, sc)[tail]
        out["rms_norm_modulate"] = _rel_err(got, ref.norm_modulate(x[tail], w, sh, sc))
    except torch.OutOfMemoryError:
        out["skipped"] = "not enough GPU memory"
    finally:
        torch.cuda.empty_cache()
    return out


def step_forward(c: Check, put) -> None:
    from pipeline.memory import tile_bytes, weight_bytes

    cfg, dev, dtype = c.cfg, c.device, c.dtype
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in c.report.data.get("device", "")), None)
    nets = {"eager": build_net(cfg, dev, dtype, "torch")}
    if _triton_runs(dev):
        nets["kernels"] = build_net(cfg, dev, dtype, "triton")
        nets["kernels"].load_state_dict(nets["eager"].state_dict())
    if c.compile:
        nets["compile"] = torch.compile(nets["eager"])
    for size in c.sizes:
        H = W = size
        g = torch.Generator(device=dev).manual_seed(1)
        lat = torch.randn(1, cfg.lq_latent_channels or cfg.lq_in_channels, H // cfg.latent_factor,
                          W // cfg.latent_factor, device=dev, dtype=dtype, generator=g)  # fmt: skip
        x = torch.randn(1, 3, H, W, device=dev, dtype=dtype, generator=g)
        y = torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, device=dev, dtype=dtype, generator=g)
        t, s = torch.tensor([866.0], device=dev), torch.tensor([0.2], device=dev)
        flops = forward_flops(cfg, H, W, cfg.txt_max_length)
        est = (weight_bytes(cfg, dtype) + tile_bytes(cfg, (H, W), dtype)) / 2**30
        put(f"{size}²", {"tflop": flops / 1e12, "memory_model_gib": est})
        ref_out = None
        for name, net in nets.items():
            need = 240 if name == "compile" else 30
            if not c.has(need):
                put(f"{size}² {name}", "skipped: time budget")
                continue
            with torch.inference_mode():
                feats = net.encode_lq((H, W), latent=lat) if name != "compile" else nets["eager"].encode_lq(
                    (H, W), latent=lat)  # fmt: skip
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.time()
                out = net(x, t, y, feats, s)
                _sync(dev)
                first = time.time() - t0
                ms = _median_ms(lambda: net(x, t, y, feats, s), c.reps, warmup=1)
            entry = {"ms": ms, "first_call_s": round(first, 2)}
            ref_out = out if ref_out is None else ref_out
            entry["rel_err_vs_eager"] = _rel_err(out, ref_out)
            if dev.type == "cuda":
                entry["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                entry["peak_vs_model"] = entry["peak_gib"] / est
            if peak:
                entry["mfu"] = flops / (ms / 1e3) / (peak * 1e12)
            put(f"{size}² {name}", entry)
            if entry["rel_err_vs_eager"] > (2e-2 if dtype == torch.bfloat16 else 1e-3):
                c.report.data.setdefault("failures", []).append(f"forward {size}² {name}: {entry['rel_err_vs_eager']}")


def _doctor_preset(c: Check):
    """The preset the loop runs: flux-2k (random weights) on a GPU; the same layout with the tiny config in a smoke."""
    import dataclasses

    from pipeline.model.presets import get_preset

    p = get_preset("flux-2k")
    if c.smoke:
        p = dataclasses.replace(p, config=c.cfg, envelope=(c.sizes[0], c.sizes[0]), text_encoder="none")
    return p


def step_diffuse_loop(c: Check, put) -> None:
    """The diffuse stage's real sampler (x, x0, noise on the device; 4 steps) at 1, 2 and 4 tiles per network call;
    the host's share of a step = 1 - (time in the network's forward) / (time of the whole step)."""
    from pipeline.stages.diffuse import DiffuseItem, DiffuseStage
    from pipeline.tiling import TilePlan

    preset, cfg, dev = _doctor_preset(c), c.cfg, c.device
    size = c.sizes[0]
    net = build_net(cfg, dev, c.dtype, "triton" if dev.type == "cuda" else "torch")
    stage = DiffuseStage(loaded=(preset, net), memory_budget=1 << 40)
    forward_s = [0.0]
    inner = net.forward

    def timed(*a, **kw):  # the network's own time, synchronised, inside the real loop
        _sync(dev)
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        _sync(dev)
        forward_s[0] += time.perf_counter() - t0
        return out

    lat, unit = size // cfg.latent_factor, cfg.latent_spatial_down_factor  # latent_factor: output px per latent px
    plan = TilePlan((lat * unit,) * 2, unit, cfg.latent_factor, cfg.sr_scale, (lat, lat), (lat, lat), (1, 1))
    chans = cfg.lq_latent_channels or cfg.lq_in_channels
    y = torch.zeros(cfg.txt_max_length, cfg.txt_embed_dim)
    for batch in (1, 2, 4):
        if not c.has(45):
            put(f"{size}² batch {batch}", "skipped: time budget")
            continue
        items = [DiffuseItem(torch.randn(chans, lat, lat), y, plan, i, 0.1, 4) for i in range(batch)]
        stage.diffuse_many(items[:1], steps=1)  # warm (kernels compiled, caches filled)
        net.forward = timed
        forward_s[0] = 0.0
        _sync(dev)
        t0 = time.perf_counter()
        stage.diffuse_many(items, steps=4)
        _sync(dev)
        wall = time.perf_counter() - t0
        net.forward = inner
        put(f"{size}² batch {batch}", {"s_per_image": wall / batch, "tiles_per_s": batch / wall,
                                       "host_share": 1 - forward_s[0] / wall})  # fmt: skip


def step_golden(c: Check, put) -> None:
    from pipeline.golden import verify

    folder = (
        Path(c.golden)
        if c.golden
        else next(
            (p for p in (Path(".gpu"), Path(__file__).resolve().parents[2] / "shared" / "golden") if p.is_dir()), None
        )
    )
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if not files:
        put("skipped", "no fixtures found (pass --golden DIR)")
        return
    if c.device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # parity in fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
    for f in files:
        rep = verify(f, device=c.device)
        put(f.name, {"kind": rep.kind, "ok": rep.ok,
                     **{ch.name: ch.error if ch.error is not None else ch.note for ch in rep.checks},
                     **{f"{ch.name} tolerance": ch.tolerance for ch in rep.checks},
                     **({"problem": rep.problem} if rep.problem else {})})  # fmt: skip


def step_graph(c: Check, put) -> None:
    """The bundled small model through the stage graph on the device and on the CPU: the same image."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    side = 24 if c.smoke else 96
    arr = (np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    outs, times = {}, {}
    for dev in dict.fromkeys([str(c.device), "cpu"]):
        graph = StageGraph(ModelOptions(preset="small", device=dev, dtype="fp32"))
        stages = graph.build_all()
        next(graph.run_local([{"key": "w", "bytes": buf.getvalue()}], stages))  # warm
        t0 = time.perf_counter()
        row = next(graph.run_local([{"key": "x", "bytes": buf.getvalue()}], stages))
        times[dev] = time.perf_counter() - t0
        if row.get("status") != "ok":
            raise RuntimeError(f"the small preset failed on {dev}: {row.get('error')}")
        outs[dev] = np.asarray(Image.open(io.BytesIO(row["output"])).convert("RGB"), dtype=np.float64)
    mse = float(((outs[str(c.device)] - outs["cpu"]) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)
    put(f"small {side}² -> {side * 4}²", {"seconds": times, "psnr_device_vs_cpu_db": psnr})
    if psnr < 40:
        c.report.data.setdefault("failures", []).append(f"small preset on {c.device} vs CPU: {psnr:.1f} dB")


def _precision_case(net32, inputs: dict, device, reps: int) -> dict:
    """One network's forward (LQ encoding included) in fp32, with bf16 weights (how pidray runs on a GPU), and with
    fp32 weights under bf16 autocast (how the official code runs): errors relative to fp32, and ms."""
    import copy

    def fwd(net, dt):
        i = {k: v.to(dt) if v.is_floating_point() and k != "t" else v for k, v in inputs.items()}
        lq = net.encode_lq(tuple(i["x"].shape[-2:]), latent=i["latent"])
        return net(i["x"], i["t"], i["y"], lq, i["sigma"])

    def autocast_fwd():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fwd(net32, torch.float32)

    with torch.inference_mode():
        ref = fwd(net32, torch.float32)
        net16 = copy.deepcopy(net32).to(torch.bfloat16)
        res = {"bf16_weights_rel_err": _rel_err(fwd(net16, torch.bfloat16), ref),
               "autocast_rel_err": _rel_err(autocast_fwd(), ref)}  # fmt: skip
        if reps:
            res["fp32_ms"] = _median_ms(lambda: fwd(net32, torch.float32), reps, 0)
            res["bf16_weights_ms"] = _median_ms(lambda: fwd(net16, torch.bfloat16), reps, 0)
            res["autocast_ms"] = _median_ms(autocast_fwd, reps, 0)
    return res


def step_precision(c: Check, put) -> None:
    """Issue 12 (9): bf16 weights without autocast vs fp32 weights under bf16 autocast, against fp32 — on the
    golden PiD fixtures (official fp32 outputs) and on the full-depth network with random weights."""
    from pipeline.golden import fixture_kind
    from pipeline.model.config import PidConfig
    from pipeline.model.loading import load_network, network_tensors, read_state_dict

    folder = Path(c.golden) if c.golden else None
    for f in sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []:
        t, meta = read_state_dict(f)
        if fixture_kind(t) not in ("pid", "pid_teacher"):
            continue
        net = load_network(PidConfig.from_official(json.loads(meta["config"])), network_tensors(t)).to(c.device)
        names = {"x": "input.x", "t": "input.t", "y": "input.y", "latent": "input.lq_latent",
                 "sigma": "input.degrade_sigma"}  # fmt: skip
        put(f.name, _precision_case(net, {k: t[v].to(c.device) for k, v in names.items()}, c.device, 0))
    size = c.sizes[0]
    if not c.has(60):
        put(f"random weights {size}²", "skipped: time budget")
        return
    cfg, dev = c.cfg, c.device
    net = build_net(cfg, dev, torch.float32, "torch")
    g = torch.Generator(device=dev).manual_seed(2)
    f = cfg.latent_factor
    inputs = {"latent": torch.randn(1, cfg.lq_latent_channels or cfg.lq_in_channels, size // f, size // f,
                                    device=dev, generator=g),
              "x": torch.randn(1, 3, size, size, device=dev, generator=g),
              "y": torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, device=dev, generator=g),
              "t": torch.tensor([866.0], device=dev), "sigma": torch.tensor([0.2], device=dev)}  # fmt: skip
    put(
        f"random weights {size}², depth {cfg.patch_depth}+{cfg.pixel_depth}",
        _precision_case(net, inputs, dev, 1 if dev.type == "cpu" else c.reps),
    )


def step_weights(c: Check, put) -> None:
    """The weights a deployment will load are where it looks ($PIDRAY_PRESET, default small; $PIDRAY_WEIGHTS): the
    image's health check, so a pod without its weights volume says so instead of failing at the first request."""
    from pipeline.model.presets import get_preset
    from pipeline.weights import resolve

    preset = get_preset(os.environ.get("PIDRAY_PRESET", "small"))
    put("preset", preset.name)
    paths = resolve(preset, allow_download=False)  # raises, listing every missing file with its command
    put("found", {k: str(v) for k, v in paths.items()})


STEPS = {"versions": step_versions, "kernels": step_kernels, "forward": step_forward,
         "diffuse_loop": step_diffuse_loop, "golden": step_golden, "graph": step_graph,
         "precision": step_precision, "weights": step_weights}  # fmt: skip


def run(args) -> dict:
    c = Check(args)
    wanted = args.steps.split(",") if args.steps else list(STEPS)
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:  # a usage error: one line, exit 2, as every pidray command
        print(f"pidray doctor: unknown step(s) {unknown}; steps: {', '.join(STEPS)}", file=sys.stderr)
        raise SystemExit(2)
    t_all = time.time()
    for name in wanted:
        if not c.has(10):
            c.report.put(name, "status", "skipped: time budget")
            continue
        t0 = time.time()
        try:
            STEPS[name](c, lambda k, v, _n=name: c.report.put(_n, k, v))
            status = "ok"
        except Exception as e:  # a step's failure is a finding: recorded, and the next step runs
            status = f"error: {type(e).__name__}: {e}"
            c.report.put(name, "traceback", traceback.format_exc(limit=6))
        c.report.put(name, "status", status)
        c.report.put(name, "seconds", round(time.time() - t0, 1))
        print(f"doctor: {name}: {status} ({time.time() - t0:.1f}s)", flush=True)
    c.report.data["wall_s"] = round(time.time() - t_all, 1)
    c.report.flush()
    return c.report.data


def add_args(ap) -> None:
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU with a tiny config (seconds)")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of: {', '.join(STEPS)}")
    ap.add_argument("--sizes", default=None, help="output sides for kernels/forward/loop (default 2048,3840)")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the forward step")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds: steps that would run past it are skipped")
    ap.add_argument("--golden", default=None, help="folder of golden fixtures (default .gpu/ or ../shared/golden)")
    ap.add_argument("--out", default="out/doctor", help="report folder (doctor.json, doctor.md), rewritten as it goes")


def cmd(args) -> int:
    rep = run(args)
    md = Report(None)
    md.data = rep
    print(md.markdown())
    bad = [f"{s}: {v['status']}" for s, v in rep["steps"].items() if not str(v.get("status", "")).startswith(
        ("ok", "skipped"))] + rep.get("failures", [])  # fmt: skip
    for b in bad:
        print(f"doctor: FAILED {b}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.doctor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_args(ap)
    return cmd(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
