"""The device steps: versions and SDPA backends, every kernel vs its reference, the whole forward."""

from __future__ import annotations

import os
import platform
import time

import torch

from pipeline.doctor.common import (
    PEAK_BF16_TFLOPS,
    build_net,
    forward_flops,
    kernel_cases,
    median_ms,
    rel_err,
    sync,
    triton_runs,
)
from pipeline.doctor.harness import Check, Skipped, innermost


def step_versions(c: Check, put) -> None:
    c.item(put, "versions", lambda: _versions(c, put))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, size = c.cfg, c.sizes[0]
    L = (size // cfg.patch_size) ** 2
    heads_p, dim_p = cfg.num_groups, cfg.hidden_size // cfg.num_groups
    heads_x, dim_x = cfg.pixel_num_groups, cfg.pixel_attn_dim // cfg.pixel_num_groups

    def sdpa(label, h, d):
        q = torch.randn(1, h, L + cfg.txt_max_length, d, device=c.device, dtype=c.dtype)
        ref = None
        res = {}
        for be in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.CUDNN_ATTENTION):  # fmt: skip
            try:
                with sdpa_kernel([be]):
                    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
                    ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), c.reps, 1)
                ref = out if ref is None else ref
                res[be.name.lower()] = f"{ms:.3f} ms, rel err {rel_err(out, ref):.1e}"
            except RuntimeError as e:
                res[be.name.lower()] = f"unavailable ({str(e).splitlines()[0][:80]})"
        put(f"sdpa {label} {h}x{d}, {L} tokens", res)

    for label, (h, d) in (("patch attention", (heads_p, dim_p)), ("pixel attention", (heads_x, dim_x))):
        c.item(put, f"sdpa {label}", lambda label=label, h=h, d=d: sdpa(label, h, d))


def _versions(c: Check, put) -> None:
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


def step_kernels(c: Check, put) -> None:
    if not triton_runs(c.device):
        raise Skipped("Triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU) and triton installed")
    p = c.cfg.patch_size
    odd = p * (3 if c.smoke else 37)  # an odd number of patches per side: rows that fill no power of two

    def agreement(dtype, tol):
        found = {}
        for name, ours, eager in kernel_cases(c.cfg, odd, odd + p * 2, c.device, dtype):
            try:  # each case on its own: one kernel's error leaves the others' figures
                err = rel_err(ours(), eager())
            except Exception as e:  # one kernel case's failure is a finding: the other cases still run
                found[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
                put(f"agreement {str(dtype)[6:]} {name} traceback", innermost(e))
                c.report.data.setdefault("failures", []).append(f"kernel {name} {dtype}: {type(e).__name__}")
                continue
            found[name] = f"{err:.1e} {'ok' if err <= tol else 'FAIL'}"
            put(f"agreement {str(dtype)[6:]}", dict(found))
            if err > tol:
                c.report.data.setdefault("failures", []).append(f"kernel {name} {dtype}: rel err {err:.2e}")
        put(f"agreement {str(dtype)[6:]}", dict(found))

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        c.item(put, f"agreement {str(dtype)[6:]}", lambda dtype=dtype, tol=tol: agreement(dtype, tol))
    if c.device.type == "cuda":
        c.item(put, "offsets past 2^31 elements", lambda: put("offsets past 2^31 elements", _big_offsets(c.device)))
    size = c.sizes[0]
    cases = c.item(put, f"speed {size}²", lambda: kernel_cases(c.cfg, size, size, c.device, c.dtype), need=20)
    for name, ours, eager in cases or []:

        def speed(ours=ours, eager=eager):
            t_ours, t_eager = median_ms(ours, c.reps), median_ms(eager, c.reps)
            return {"ours_ms": t_ours, "eager_ms": t_eager, "speedup": t_eager / t_ours}

        res = c.item(put, f"speed {size}² {name}", speed, need=10)
        if res is not None:
            put(f"speed {size}² {name}", res)


def _big_offsets(device) -> dict:
    """The row kernels on tensors of more than 2^31 elements: the last rows (offsets past int32) vs the reference."""
    from pipeline.kernels.gated_residual import gated_residual
    from pipeline.kernels.gated_residual import reference as gated_reference
    from pipeline.kernels.rms_norm_modulate import norm_modulate, rms_norm_modulate

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
        out["gated_residual"] = rel_err(got, gated_reference(x[tail], gate, y[tail]))
        del got
        got = rms_norm_modulate(x, w, sh, sc)[tail]
        out["rms_norm_modulate"] = rel_err(got, norm_modulate(x[tail], w, sh, sc))
    except torch.OutOfMemoryError:
        out["skipped"] = "not enough GPU memory"
    finally:
        torch.cuda.empty_cache()
    return out


def sdpa_kernels(fn, device) -> list[str]:
    """The attention kernels one call of fn ran, by the profiler's names (which SDPA backend was picked)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        fn()
        sync(device)
    pat = ("scaled_dot_product", "flash", "fmha", "attention", "cudnn", "efficient")
    return sorted({e.key for e in prof.key_averages() if any(p in e.key.lower() for p in pat)})[:8]


def step_forward(c: Check, put) -> None:
    """Each (size, network) is an item of its own: eager, our kernels, torch.compile (with --full, at the first size
    only: one compile; the diffuse loop's compiled case compiles the network by default), FP8. The networks are
    built once, on first use, from the eager one's weights."""
    from pipeline.memory import tile_bytes, weight_bytes

    cfg, dev, dtype = c.cfg, c.device, c.dtype
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in c.report.data.get("device", "")), None)
    names = ["eager"] + (["kernels"] if triton_runs(dev) else []) + (["compile"] if c.compile and c.full else [])
    if c.fp8 and dtype != torch.float32 or c.smoke:  # e4m3 matmuls (`--precision fp8`); the smoke run checks them too
        names.append("fp8")
    nets: dict = {}

    def net_of(name):
        if name not in nets:
            if name == "eager":
                nets[name] = build_net(cfg, dev, dtype, "torch")
            elif name == "compile":
                nets[name] = torch.compile(net_of("eager"))
            else:
                net = build_net(cfg, dev, dtype, "triton" if triton_runs(dev) else "torch")
                net.load_state_dict(net_of("eager").state_dict())
                if name == "fp8":
                    from pipeline.kernels.fp8 import quantize_fp8

                    quantize_fp8(net)
                nets[name] = net
        return nets[name]

    for k, size in enumerate(c.sizes):
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
        ref: dict = {}

        def one(name, size=size, x=x, t=t, y=y, s=s, lat=lat, flops=flops, est=est, ref=ref):
            net = net_of(name)
            with torch.inference_mode():
                feats = (nets["eager"] if name == "compile" else net).encode_lq((size, size), latent=lat)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.time()
                out = net(x, t, y, feats, s)
                sync(dev)
                first = time.time() - t0
                ms = median_ms(lambda: net(x, t, y, feats, s), c.reps, warmup=1)
            entry = {"ms": ms, "first_call_s": round(first, 2)}
            if name == "eager":
                ref["out"] = out
            if "out" in ref:
                entry["rel_err_vs_eager"] = rel_err(out, ref["out"])
            if dev.type == "cuda":
                entry["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                entry["peak_vs_model"] = entry["peak_gib"] / est
            if peak:
                entry["mfu"] = flops / (ms / 1e3) / (peak * 1e12)
            if name == "eager":
                entry["sdpa_kernels"] = sdpa_kernels(lambda: net(x, t, y, feats, s), dev)
            put(f"{size}² {name}", entry)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
            if name == "fp8":
                tol = 0.25  # e4m3: a 3-bit mantissa; its figure is reported, the gate is the quality test's
            if entry.get("rel_err_vs_eager", 0.0) > tol:
                c.report.data.setdefault("failures", []).append(f"forward {size}² {name}: {entry['rel_err_vs_eager']}")

        for name in names:
            if name == "compile" and k > 0:
                continue  # one compile (a new shape recompiles: another minute for the same finding)
            c.item(put, f"{size}² {name}", lambda name=name, one=one: one(name), need=None)
