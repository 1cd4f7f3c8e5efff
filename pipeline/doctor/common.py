"""What the doctor's steps share: FLOP count, timing, random-weight networks, the tiny config, errors."""

from __future__ import annotations

import os
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


def median_ms(fn, reps: int, warmup: int = 2) -> float:
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
    """(name, ours, eager) closures at the shapes the network runs for an H × W output: every op of `OPS`."""
    from pipeline.kernels import OPS

    return [case for op in OPS if op.cases is not None for case in op.cases(cfg, H, W, device, dtype)]


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


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (inf when shapes differ); the worst pair for tuples of tensors."""
    if isinstance(a, (tuple, list)):
        return max(rel_err(x, y) for x, y in zip(a, b, strict=True))
    if a.shape != b.shape:
        return float("inf")
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def triton_runs(device: torch.device) -> bool:
    """Triton is installed and can run here: on CUDA, or in its interpreter on the CPU (TRITON_INTERPRET=1)."""
    from pipeline.kernels import triton_available

    return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
