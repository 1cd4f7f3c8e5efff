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


def vae_encode_bytes(
    hw: tuple[int, int], dtype: torch.dtype, ch: int = 128, tile_px: int | None = 1024, margin_px: int = 128
) -> int:
    """Peak bytes of a convolutional VAE encode of an hw-pixel image: about five full-resolution activations of
    `ch` channels for the largest piece encoded at once (one tile plus its margins when tiled, as
    `LatentEncoder.encode` does), plus the input image in fp32."""
    H, W = hw
    if tile_px and max(H, W) > tile_px + 2 * margin_px:
        H, W = min(H, tile_px + 2 * margin_px), min(W, tile_px + 2 * margin_px)
    s = torch.finfo(dtype).bits // 8
    return int(5 * H * W * ch * s + hw[0] * hw[1] * 3 * 4)


def default_budget(device: torch.device, gpu_share: float = 1.0) -> int:
    """Bytes the diffuse stage may use for activations. On a GPU: its declared share of the card's memory (the
    graph's `gpu_share`; stages sharing a card each keep to theirs), less what this process already holds (the
    weights), at 90% — never what happens to be free at start, which depends on who started first. On a CPU: a
    quarter of host RAM, at most 16 GiB."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(256 << 20, int(total * gpu_share * 0.9) - torch.cuda.memory_allocated(device))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(total // 4, 16 << 30))


def batch_size_for(cfg: PidConfig, out_hw, dtype, budget: int, n_tiles: int | None = None) -> int:
    """Largest batch of tiles whose activations fit `budget` (at least 1), capped at n_tiles."""
    b = max(1, budget // max(1, tile_bytes(cfg, out_hw, dtype)))
    return int(min(b, n_tiles)) if n_tiles else int(b)
