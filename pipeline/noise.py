"""Deterministic noise: per-file seeds, and noise keyed to global canvas coordinates.

Tiles that overlap must see the same noise in the overlap, whichever process or device draws it, and an image must
not depend on its tile plan or on the images batched beside it. `CanvasNoise` is counter-based: the value at
(draw, channel, y, x) is a hash of (seed, draw, channel, y, x) turned into a normal by Box–Muller, computed with
int32 tensor ops wherever the tensors live (a few vectorised passes per draw, no generator, no host round trip).
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


def hash32(x: int) -> int:
    """A 32-bit integer mixer (two xorshift-multiply rounds) on Python ints < 2^32; `_hash32` is its tensor twin."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _s32(v: int) -> int:
    """The int32 with the bits of unsigned v."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _lsr(h: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 bits (torch's >> is arithmetic)."""
    return (h >> s) & ((1 << (32 - s)) - 1)


def _xor_lsr_(h: torch.Tensor, s: int, tmp: torch.Tensor) -> torch.Tensor:
    """h ^= h >>> s in place (tmp: scratch of h's shape)."""
    torch.bitwise_right_shift(h, s, out=tmp)
    return h.bitwise_xor_(tmp.bitwise_and_((1 << (32 - s)) - 1))


def _hash32(h: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """hash32 on int32 tensors holding 32-bit patterns: products wrap mod 2^32 on every device. In place on h when
    `inplace` (the big per-pixel tensors: no temporaries beyond one scratch buffer)."""
    h = h if inplace else h.clone()
    tmp = torch.empty_like(h)
    _xor_lsr_(h, 16, tmp).mul_(_s32(0x7FEB352D))
    _xor_lsr_(h, 15, tmp).mul_(_s32(0x846CA68B))
    return _xor_lsr_(h, 16, tmp)


def _normal_pairs(h: torch.Tensor) -> torch.Tensor:
    """Two standard normals per 32-bit hash (Box–Muller on two 24-bit uniforms): [...] int32 -> [..., 2] float32."""
    u1 = (_lsr(h, 8) + 1).to(torch.float32).mul_(2.0**-24)  # (0, 1]
    h = _hash32(h.bitwise_xor_(_s32(0x68E31DA4)), inplace=True)  # h is ours: reused for the angle
    u2 = _lsr(h, 8).to(torch.float32).mul_(2.0 * math.pi * 2.0**-24)  # angle in [0, 2π)
    r = u1.log_().mul_(-2.0).sqrt_()
    return torch.stack([torch.cos(u2), torch.sin(u2)], dim=-1).mul_(r.unsqueeze(-1))


class CanvasNoise:
    """randn-like noise [C, h, w] for any region of an unbounded canvas, keyed by global coordinates.

    Horizontal pixel pairs (2k, 2k+1) share one hash of (seed, draw, channel, y, k): the two outputs of Box–Muller.
    """

    def __init__(self, seed: int, channels: int):
        self.seed, self.channels = int(seed), channels
        s = mix("canvas-noise", self.seed)
        self.key = hash32(hash32(s & M32) ^ (s >> 32))

    def draw_key(self, draw: int) -> int:
        return hash32(self.key ^ hash32(int(draw) & M32))

    def tiles(self, draw: int, ys: torch.Tensor, ks: torch.Tensor, offsets: list[int], w: int) -> torch.Tensor:
        """Noise of N tiles: ys [N, h, 1] int32 canvas rows, ks [N, 1, K] int32 pixel-pair columns (pair k covers
        x = 2k, 2k+1) starting at each tile's x // 2, offsets [N] each tile's x % 2 -> [N, C, h, w] float32."""
        c = torch.arange(self.channels, device=ys.device, dtype=torch.int32).view(-1, 1, 1)  # -> [C, 1, 1]
        hc = _hash32(c ^ _s32(self.draw_key(draw)))
        hy = _hash32(hc ^ ys.unsqueeze(-3))  # -> [N, C, h, 1]
        z = _normal_pairs(_hash32(hy ^ ks.unsqueeze(-3), inplace=True)).flatten(-2)  # -> [N, C, h, 2K]
        if len(set(offsets)) == 1:
            return z[..., offsets[0] : offsets[0] + w]
        return torch.stack([t[..., o : o + w] for t, o in zip(z, offsets)])

    def region(self, draw: int, y0: int, x0: int, h: int, w: int, device=None) -> torch.Tensor:
        return TileNoise(self.seed, [(y0, x0)], (h, w), self.channels, device)(draw)[0]


class TileNoise:
    """Sampler noise for a stack of tiles: draw i -> [N, C, th, tw] of one image's CanvasNoise, on `device`.

    The tiles' coordinates are built once, on the device; each draw is then integer ops on the device alone.
    """

    def __init__(self, seed: int, origins_px: list[tuple[int, int]], tile_hw: tuple[int, int], channels: int = 3,
                 device=None):  # fmt: skip
        self.canvas = CanvasNoise(seed, channels)
        th, self.tw = tile_hw
        n = len(origins_px)
        ar_h = torch.arange(th, device=device, dtype=torch.int32)
        ar_k = torch.arange((self.tw + 2) // 2, device=device, dtype=torch.int32)
        # origins enter as Python ints (no host tensor to copy): one row of coordinates per tile
        self.ys = torch.stack([ar_h + y for y, _ in origins_px]).view(n, th, 1)  # -> [N, th, 1]
        self.ks = torch.stack([ar_k + x // 2 for _, x in origins_px]).view(n, 1, -1)  # -> [N, 1, K]
        self.offsets = [x % 2 for _, x in origins_px]

    def __call__(self, draw: int) -> torch.Tensor:
        return self.canvas.tiles(draw, self.ys, self.ks, self.offsets, self.tw)
