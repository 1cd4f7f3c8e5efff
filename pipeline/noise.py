"""Deterministic noise: per-file seeds, and noise keyed to global canvas coordinates.

Tiles that overlap must see the same noise in the overlap, whichever process draws it. The canvas
is cut into fixed cells; each cell's noise comes from its own generator seeded by
(seed, draw, cell row, cell column), so any region can be drawn independently and identically.
"""

from __future__ import annotations

import hashlib

import torch

CELL = 64


def mix(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (same on every machine and Python run)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def file_seed(run_seed: int, key: str) -> int:
    """Per-file seed: depends on the run seed and the file's relative key only, never on the worker."""
    return mix("pidray-file", int(run_seed), key) % (2**31)


class CellNoise:
    """randn of shape [C, h, w] for any region of an unbounded canvas, keyed by global coordinates."""

    def __init__(self, seed: int, channels: int, cell: int = CELL):
        self.seed, self.channels, self.cell = int(seed), channels, cell

    def _cell(self, draw: int, cy: int, cx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix(self.seed, draw, cy, cx))
        return torch.randn(self.channels, self.cell, self.cell, generator=g)

    def region(self, draw: int, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
        c = self.cell
        out = torch.empty(self.channels, h, w)
        for cy in range(y0 // c, (y0 + h - 1) // c + 1):
            for cx in range(x0 // c, (x0 + w - 1) // c + 1):
                ys, xs = max(y0, cy * c), max(x0, cx * c)
                ye, xe = min(y0 + h, (cy + 1) * c), min(x0 + w, (cx + 1) * c)
                block = self._cell(draw, cy, cx)
                out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = block[
                    :, ys - cy * c : ye - cy * c, xs - cx * c : xe - cx * c
                ]
        return out


class TileNoise:
    """Sampler noise source for a stack of tiles: draw i -> [N, C, th, tw] cut from one global CellNoise."""

    def __init__(self, seed: int, origins_px: list[tuple[int, int]], tile_hw: tuple[int, int], channels: int = 3):
        self.cells = CellNoise(seed, channels)
        self.origins, self.tile_hw = origins_px, tile_hw

    def __call__(self, draw: int) -> torch.Tensor:
        th, tw = self.tile_hw
        return torch.stack([self.cells.region(draw, y, x, th, tw) for y, x in self.origins])
