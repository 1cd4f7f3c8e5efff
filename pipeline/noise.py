"""Deterministic noise: per-file seeds, and noise keyed to global canvas coordinates.

Tiles that overlap must see the same noise in the overlap, whichever process or device draws it, and an image must
not depend on its tile plan or on the images batched beside it. `CanvasNoise` is counter-based: the value at
(draw, channel, y, x) is a hash of (seed, draw, channel, y, x) turned into a normal by Box–Muller, computed with
integer tensor ops wherever the tensors live (one vectorised pass per draw, no generator, no host round trip).
CPU and GPU give the same integers, so the same noise up to the last rounding of log/sqrt/cos.
"""

from __future__ import annotations

import hashlib
import math

import torch

M32 = 0xFFFFFFFF


def mix(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (same on every machine and Python run)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def file_seed(run_seed: int, key: str) -> int:
    """Per-file seed: depends on the run seed and the file's relative key only, never on the worker."""
    return mix("pidray-file", int(run_seed), key) % (2**31)


def hash32(x):
    """A 32-bit integer mixer (xorshift-multiply rounds) on non-negative int64 tensors or Python ints < 2^32.

    Products are masked back to 32 bits: int64 holds any product of two 32-bit values' low bits exactly mod 2^64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _normal(h: torch.Tensor) -> torch.Tensor:
    """Standard normals from 32-bit hashes (two uniforms of 24 bits each, Box–Muller), float32."""
    u1 = ((h >> 8) + 1).to(torch.float32) * 2.0**-24  # (0, 1]
    u2 = (hash32(h ^ 0x68E31DA4) >> 8).to(torch.float32) * 2.0**-24  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


class CanvasNoise:
    """randn-like noise [C, h, w] for any region of an unbounded canvas, keyed by global coordinates."""

    def __init__(self, seed: int, channels: int):
        self.seed, self.channels = int(seed), channels
        s = mix("canvas-noise", self.seed)
        self.key = hash32(hash32(s & M32) ^ (s >> 32))

    def draw_key(self, draw: int) -> int:
        return hash32(self.key ^ hash32(int(draw) & M32))

    def at(self, draw: int, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Noise at every (channel, y, x) for int64 coordinate tensors that broadcast: ys [..., h, 1], xs [..., 1, w]
        -> [..., C, h, w] on their device. The per-row hash is computed on [.., C, h, 1] only."""
        c = torch.arange(self.channels, device=ys.device, dtype=torch.int64).view(-1, 1, 1)  # -> [C, 1, 1]
        hc = hash32(c ^ self.draw_key(draw))
        hy = hash32(hc ^ ys.unsqueeze(-3))  # -> [..., C, h, 1]
        return _normal(hash32(hy ^ xs.unsqueeze(-3)))  # -> [..., C, h, w]

    def region(self, draw: int, y0: int, x0: int, h: int, w: int, device=None) -> torch.Tensor:
        ys = torch.arange(y0, y0 + h, device=device, dtype=torch.int64).view(h, 1)
        xs = torch.arange(x0, x0 + w, device=device, dtype=torch.int64).view(1, w)
        return self.at(draw, ys, xs)


class TileNoise:
    """Sampler noise for a stack of tiles: draw i -> [N, C, th, tw] of one image's CanvasNoise, on `device`.

    The tiles' coordinates are built once, on the device; each draw is then integer ops on the device alone.
    """

    def __init__(self, seed: int, origins_px: list[tuple[int, int]], tile_hw: tuple[int, int], channels: int = 3,
                 device=None):  # fmt: skip
        self.canvas = CanvasNoise(seed, channels)
        th, tw = tile_hw
        n = len(origins_px)
        oy = [y for y, _ in origins_px]
        ox = [x for _, x in origins_px]
        ar_h = torch.arange(th, device=device, dtype=torch.int64)
        ar_w = torch.arange(tw, device=device, dtype=torch.int64)
        # origins enter as Python ints (no host tensor to copy): one row of coordinates per tile
        self.ys = torch.stack([ar_h + y for y in oy]).view(n, th, 1)  # -> [N, th, 1]
        self.xs = torch.stack([ar_w + x for x in ox]).view(n, 1, tw)  # -> [N, 1, tw]

    def __call__(self, draw: int) -> torch.Tensor:
        return self.canvas.at(draw, self.ys, self.xs)
