"""Memory model of one diffuse step: bytes per tile, and the batch size that fits a budget.

The estimate counts the largest tensors alive at once in the forward pass (inference mode, no
autograd): the pixel pathway dominates ([B·L, p², d] pixel tokens and their 6× modulation),
then the patch tokens, the LQ features, and the sampler's fp32 state. `tests/test_memory.py`
checks it against a measured peak on the CPU.
"""

from __future__ import annotations

import os

import torch

from pipeline.model.config import PidConfig


def tile_bytes(cfg: PidConfig, out_hw: tuple[int, int], dtype: torch.dtype) -> int:
    """Peak activation bytes of one tile's forward pass (plus its share of sampler state)."""
    s = torch.finfo(dtype).bits // 8
    H, W = out_hw
    pixels = H * W
    L = pixels // cfg.patch_size**2
    d, D = cfg.pixel_hidden_size, cfg.hidden_size
    pixel_path = pixels * d * s * (6 + 4 * 2 + 4) + pixels * cfg.pixel_in_channels * s * 2
    patch_path = L * D * s * 16 + L * cfg.pixel_attn_dim * s * 6
    lq = (cfg.num_lq_outputs + 1) * L * D * s + L * cfg.lq_hidden_dim * s * 4
    sampler = pixels * 3 * 4 * 6  # x, x0, eps, prediction, noise draw, output (fp32)
    return int(pixel_path + patch_path + lq + sampler)


def weight_bytes(cfg: PidConfig, dtype: torch.dtype) -> int:
    from pipeline.model.network import PidNet

    with torch.device("meta"):
        n = sum(p.numel() for p in PidNet(cfg).parameters())
    return n * (torch.finfo(dtype).bits // 8)


def default_budget(device: torch.device) -> int:
    """Bytes the diffuse stage may use for activations: 80% of free GPU memory, or a quarter of host RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(total // 4, 16 << 30))


def batch_size_for(cfg: PidConfig, out_hw, dtype, budget: int, n_tiles: int | None = None) -> int:
    """Largest batch of tiles whose activations fit `budget` (at least 1), capped at n_tiles."""
    b = max(1, budget // max(1, tile_bytes(cfg, out_hw, dtype)))
    return int(min(b, n_tiles)) if n_tiles else int(b)
