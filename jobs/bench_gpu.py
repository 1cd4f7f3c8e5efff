"""`pidray bench kernels`: the Triton kernels against their eager chains, and the whole PiD forward, on a GPU.

Full-size released network (preset flux-2k: hidden 1536, 14 patch + 2 pixel blocks) with random bf16
weights, batch 1, at 2048² and 3840² outputs. Prints per-kernel medians (ours vs eager), whole-forward
medians for eager / our kernels / torch.compile(eager), peak memory, and model FLOPs utilisation.
FLOPs are counted analytically (`forward_flops`): 2·M·N·K per matmul and 4·N²·d per attention, for every
linear, attention and convolution of the forward pass; element-wise work is not counted.
Designed to finish in one device call (< 8 minutes); `--tiny` runs a small config on any device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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
    from pipeline.kernels import get_ops
    from pipeline.model.network import PidNet

    torch.manual_seed(0)
    with torch.device(device):
        net = PidNet(cfg, ops=get_ops(backend, device), dtype=dtype)
    with torch.no_grad():
        for prm in net.parameters():
            prm.normal_(0, 0.02)
    return net.eval().requires_grad_(False)


def run(args) -> dict:
    from pipeline.model.config import PidConfig
    from pipeline.model.presets import get_preset

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = get_preset("flux-2k").config
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.tiny:
        cfg = PidConfig(
            hidden_size=64, num_groups=4, pixel_hidden_size=16, pixel_attn_hidden_size=32, pixel_num_groups=2,
            patch_depth=2, pixel_depth=1, txt_embed_dim=32, txt_max_length=8, lq_hidden_dim=16, lq_num_res_blocks=1,
        )  # fmt: skip
    t_start = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    report = {"device": name, "dtype": str(dtype), "config": "flux-2k" if not args.tiny else "tiny", "sizes": {}}
    nets = {b: build_net(cfg, device, dtype, b) for b in ("torch", "triton")}
    nets["triton"].load_state_dict(nets["torch"].state_dict())
    for size in sizes:
        H = W = size
        res = {"kernels": {}}
        for kname, ours, eager in kernel_cases(cfg, H, W, device, dtype):
            if time.time() - t_start > args.budget_s:
                res["kernels"][kname] = "skipped: time budget"
                continue
            t_ours, t_eager = _median_ms(ours, args.reps), _median_ms(eager, args.reps)
            res["kernels"][kname] = {"ours_ms": t_ours, "eager_ms": t_eager, "speedup": t_eager / t_ours}
        lat = torch.randn(1, cfg.lq_latent_channels, H // cfg.latent_factor, W // cfg.latent_factor, device=device,
                          dtype=dtype)  # fmt: skip
        x = torch.randn(1, 3, H, W, device=device, dtype=dtype)
        y = torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, device=device, dtype=dtype)
        t = torch.tensor([866.0], device=device)
        s = torch.tensor([0.0], device=device)
        flops = forward_flops(cfg, H, W, cfg.txt_max_length)
        res["forward_tflop"] = flops / 1e12
        variants = {"eager": nets["torch"], "triton": nets["triton"]}
        if not args.no_compile:
            variants["compile"] = torch.compile(nets["torch"])
        for vname, net in variants.items():
            if time.time() - t_start > args.budget_s:
                res[vname] = "skipped: time budget"
                continue
            with torch.inference_mode():
                feats = net.encode_lq((H, W), latent=lat)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                tc = time.time()
                ms = _median_ms(lambda: net(x, t, y, feats, s), args.reps, warmup=2 if vname == "compile" else 1)
                entry = {"ms": ms, "first_call_s": round(time.time() - tc, 1)}
                if device.type == "cuda":
                    entry["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if peak:
                    entry["mfu"] = flops / (ms / 1e3) / (peak * 1e12)
                res[vname] = entry
        report["sizes"][str(size)] = res
    report["wall_s"] = round(time.time() - t_start, 1)
    return report


def print_report(rep: dict) -> None:
    print(f"device: {rep['device']}  dtype: {rep['dtype']}  network: {rep['config']}  wall {rep['wall_s']}s")
    for size, res in rep["sizes"].items():
        print(f"\n== {size}x{size}, batch 1, forward {res['forward_tflop']:.1f} TFLOP ==")
        for k, v in res["kernels"].items():
            if isinstance(v, str):
                print(f"  {k:26s} {v}")
            else:
                print(f"  {k:26s} ours {v['ours_ms']:8.3f} ms  eager {v['eager_ms']:8.3f} ms  {v['speedup']:5.2f}x")
        for vname in ("eager", "triton", "compile"):
            v = res.get(vname)
            if v is None or isinstance(v, str):
                print(f"  forward {vname:8s} {v or 'not run'}")
                continue
            extra = "".join(f"  {k} {v[k]:.3g}" for k in ("peak_mem_gib", "mfu") if k in v)
            print(f"  forward {vname:8s} {v['ms']:9.1f} ms{extra}")
        e = res.get("eager")
        if isinstance(e, dict):
            for vname in ("triton", "compile"):
                if isinstance(res.get(vname), dict):
                    print(f"  {vname} vs eager: {e['ms'] / res[vname]['ms']:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    args = ap.parse_args(argv)
    return cmd(args)


def add_args(ap) -> None:
    ap.add_argument("--sizes", default="2048,3840")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a small config (CPU smoke test)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what would run past this many seconds")
    ap.add_argument("--json", default=None, help="also write the report here")


def cmd(args) -> int:
    rep = run(args)
    print_report(rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
