"""Tile planning in latent space, and the feathered (raised-cosine, partition-of-unity) merge of pixel tiles.

An input of h × w pixels is encoded at `unit` input pixels per latent pixel (the VAE factor; 1
for RGB-conditioned presets) and decoded at `out_per_lat` output pixels per latent pixel. Tiles
are one fixed shape per image, sized to the preset's envelope; the input is padded by reflection
so that the tiles cover it exactly (edge tiles are padded, never cropped), and the output is
cropped back to exactly sr_scale × the input. An image that fits the envelope is one tile.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.errors import BadParameter
from pipeline.imageio import TooLarge
from pipeline.options import DEFAULT_MAX_OUTPUT_SIDE

DEFAULT_OVERLAP = 8  # latent pixels (256 output pixels at 32 output pixels per latent pixel)


@dataclass(frozen=True)
class TilePlan:
    in_hw: tuple[int, int]  # input pixels
    unit: int  # input pixels per latent pixel
    out_per_lat: int  # output pixels per latent pixel
    sr_scale: int
    tile: tuple[int, int]  # latent pixels
    stride: tuple[int, int]
    grid: tuple[int, int]  # tiles down, across

    @property
    def lat_hw(self) -> tuple[int, int]:
        """Latent canvas covered by the tiles."""
        return tuple((n - 1) * s + t for n, s, t in zip(self.grid, self.stride, self.tile))

    @property
    def pad_hw(self) -> tuple[int, int]:
        """Input size after reflection padding (what gets encoded)."""
        return tuple(v * self.unit for v in self.lat_hw)

    @property
    def out_hw(self) -> tuple[int, int]:
        """Exact output size: sr_scale × input."""
        return self.in_hw[0] * self.sr_scale, self.in_hw[1] * self.sr_scale

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return tuple(v * self.out_per_lat for v in self.lat_hw)

    @property
    def tile_out(self) -> tuple[int, int]:
        return self.tile[0] * self.out_per_lat, self.tile[1] * self.out_per_lat

    @property
    def overlap(self) -> tuple[int, int]:
        return tuple(t - s if n > 1 else 0 for t, s, n in zip(self.tile, self.stride, self.grid))

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    def origins(self) -> list[tuple[int, int]]:
        """Top-left latent coordinates of every tile, row-major."""
        return [(i * self.stride[0], j * self.stride[1]) for i in range(self.grid[0]) for j in range(self.grid[1])]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TilePlan:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def target_size(in_hw, native: int, scale: float | None) -> tuple[int, int]:
    """The final output size: `native` × the input, or `scale` × the input (resized from the native result)."""
    if scale is None or float(scale) == native:
        return in_hw[0] * native, in_hw[1] * native
    return max(1, round(in_hw[0] * float(scale))), max(1, round(in_hw[1] * float(scale)))


def check_output_side(out_hw: tuple[int, int], max_output_side: int) -> None:
    if max(out_hw) > max_output_side:
        raise TooLarge(
            f"output would be {out_hw[1]}x{out_hw[0]}, over the limit of {max_output_side} pixels on the long side "
            "(configurable)"
        )


def plan_tiles(
    in_hw: tuple[int, int],
    *,
    unit: int,
    sr_scale: int,
    patch: int,
    tile_out: int,
    overlap: int = DEFAULT_OVERLAP,
    max_output_side: int = DEFAULT_MAX_OUTPUT_SIDE,
    tile_min_out: int | None = None,
    buckets: bool = False,
) -> TilePlan:
    """Plan tiles for an input of in_hw pixels.

    tile_out: the largest tile side in output pixels (the envelope's maximum); tile_min_out: the smallest a tile
    may be made (the envelope's minimum; default tile_out). An axis that needs several tiles gets the fewest that
    cover it, split evenly: every tile the same size, as small as covering allows (not below tile_min_out), so the
    pixels diffused stay close to the output's instead of padding the last tile out to the maximum.

    buckets: the tile shape is one of the few of `bucket_shapes` instead (so a long job sees a handful of tile shapes,
    whatever its image sizes: one compiled graph and warm-up each), the one that diffuses the image with the fewest
    pixels, the tiles overlapping by at least `overlap`; the input is padded by reflection to what they cover.
    """
    h, w = in_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    check_output_side((h * sr_scale, w * sr_scale), max_output_side)
    out_per_lat, m, t_full, t_min, ov = _geometry(unit, sr_scale, patch, tile_out, tile_min_out, overlap)
    lat = (-(-h // unit), -(-w // unit))
    if buckets:
        shapes = bucket_shapes(t_min * out_per_lat, t_full * out_per_lat, out_per_lat, m, unit, ov)
        shape = min(shapes, key=lambda s: (_shape_cost(lat, s, ov), s))
        axes = [_bucket_axis(size, [t], ov) for size, t in zip(lat, shape)]
        return TilePlan((h, w), unit, out_per_lat, sr_scale, *(tuple(a[i] for a in axes) for i in range(3)))
    tile, stride, grid = [], [], []
    for size in lat:
        if _round_up(size, m) <= t_full:  # fits: one tile along this axis, at the image's own size
            tile.append(_round_up(size, m))
            stride.append(tile[-1])
            grid.append(1)
        else:
            n = 1 + -(-(size - t_full) // (t_full - ov))  # the fewest tiles of the largest size that cover it
            t = max(t_min, _round_up(-(-(size + (n - 1) * ov) // n), m))  # the smallest equal tiles that do
            tile.append(t)
            stride.append(t - ov)
            grid.append(n)
    return TilePlan((h, w), unit, out_per_lat, sr_scale, tuple(tile), tuple(stride), tuple(grid))


def _geometry(unit: int, sr_scale: int, patch: int, tile_out: int, tile_min_out: int | None, overlap: int):
    """(output pixels per latent pixel, tile step m, largest and smallest tile side, overlap) in latent pixels; a tile
    is a whole number of patches."""
    out_per_lat = unit * sr_scale
    m = patch // math.gcd(patch, out_per_lat)  # latent pixels per tile step so that tiles are whole patches
    t_full = max(m, tile_out // out_per_lat // m * m)
    t_min = min(t_full, max(m, _round_up((tile_min_out or tile_out) // out_per_lat, m)))
    if overlap < 0 or _round_up(overlap, m) >= t_full:
        raise BadParameter(
            f"--overlap {overlap} must be >= 0 and below the tile size of {t_full} latent pixels (--tile {tile_out} "
            f"output pixels = {t_full} latent pixels at {out_per_lat} output pixels each): lower --overlap or raise "
            "--tile"
        )
    return out_per_lat, m, t_full, t_min, _round_up(overlap, m)


def planned_bucket_shapes(
    *, unit: int, sr_scale: int, patch: int, tile_out: int, tile_min_out: int | None = None, overlap: int
) -> tuple[tuple[int, int], ...]:
    """The bucket shapes `plan_tiles(..., buckets=True)` chooses from with these settings (what to warm up)."""
    out_per_lat, m, t_full, t_min, ov = _geometry(unit, sr_scale, patch, tile_out, tile_min_out, overlap)
    return bucket_shapes(t_min * out_per_lat, t_full * out_per_lat, out_per_lat, m, unit, ov)


MAX_BUCKET_SHAPES = 6
BUCKET_PX = 128  # bucket sides are multiples of this many output pixels (and of whole patches), or the envelope's
# 20 common input sizes (w, h) the buckets are chosen for: the Flux/SDXL generators' ~1 MP sizes in both orientations,
# photo and screen sizes
COMMON_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536), (512, 512), (640, 480), (800, 600), (1024, 768), (1280, 720), (1280, 960),
                (1920, 1080), (1080, 1350), (1080, 1920), (2048, 1536), (1000, 1500))  # fmt: skip


@functools.lru_cache(maxsize=64)
def bucket_shapes(lo_px: int, hi_px: int, out_per_lat: int, m: int, unit: int, ov: int) -> tuple[tuple[int, int], ...]:
    """The tile shapes (latent pixels, h × w) of bucketed plans: MAX_BUCKET_SHAPES of them, sides multiples of
    BUCKET_PX output pixels inside the envelope or its maximum, chosen to diffuse the fewest pixels over COMMON_SIZES
    with each image taking its cheapest shape — a greedy pick, then single swaps while one helps (flux-2k:
    1664×1920, 1664×2304, 1920×1664, 2176², 2304×2688, 2560×1792 output pixels; `tests/bench_buckets.py` compares
    it with other choices)."""
    hi = max(m, hi_px // out_per_lat // m * m)
    step = _round_up(max(1, BUCKET_PX // out_per_lat), m)
    sides = sorted({*range(_round_up(-(-lo_px // out_per_lat), step), hi, step), hi})
    sides = [t for t in sides if t > ov] or [hi]
    shapes = [(a, b) for a in sides for b in sides]
    images = [(-(-h // unit), -(-w // unit)) for w, h in COMMON_SIZES]
    cost = np.array([[_shape_cost(img, s, ov)[0] for img in images] for s in shapes], dtype=np.float64)
    return tuple(sorted(shapes[i] for i in cheapest_rows(cost, min(MAX_BUCKET_SHAPES, len(shapes)))))


def cheapest_rows(cost: np.ndarray, k: int) -> list[int]:
    """k rows of cost [option, image] whose per-image minimum sums low: a greedy pick, then single swaps while one
    lowers the sum (a local optimum, not always the best set)."""
    n = len(cost)

    def total(pick: list[int]) -> float:
        return float(cost[pick].min(axis=0).sum())

    pick: list[int] = []
    for _ in range(k):
        pick.append(min((j for j in range(n) if j not in pick), key=lambda j: total(pick + [j])))
    better = True
    while better:
        better = False
        for i, j in itertools.product(range(k), range(n)):
            trial = pick[:i] + [j] + pick[i + 1 :]
            if j not in pick and total(trial) < total(pick):
                pick, better = trial, True
    return pick


def _shape_cost(lat: tuple[int, int], shape: tuple[int, int], ov: int) -> tuple[int, int]:
    """(latent pixels diffused, tiles) for an image of `lat` latent pixels in tiles of `shape`."""
    (th, _, nh), (tw, _, nw) = (_bucket_axis(size, [t], ov) for size, t in zip(lat, shape))
    return nh * th * nw * tw, nh * nw


def _bucket_axis(size: int, sides: list[int], ov: int) -> tuple[int, int, int]:
    """(tile, stride, count) along one axis of `size` latent pixels: the side and count covering it with the fewest
    pixels (fewer tiles on a tie), overlaps of at least ov, the tiles spread evenly."""
    options = []
    for t in sides:
        n = 1 if t >= size else 1 + -(-(size - t) // (t - ov))
        options.append((n * t, n, t))
    _, n, t = min(options)
    stride = t if n == 1 else -(-(size - t) // (n - 1))
    return t, stride, n


def diffused_pixels(plan: TilePlan) -> int:
    """Output pixels the network processes per step: every tile, overlaps counted each time."""
    return plan.n_tiles * plan.tile_out[0] * plan.tile_out[1]


def pad_image(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Reflect-pad [C, H, W] at the bottom/right to hw (symmetric reflection works for 1-pixel images too)."""
    ph, pw = hw[0] - x.shape[1], hw[1] - x.shape[2]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {x.shape[1:]} to smaller {hw}")
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="symmetric") if ph or pw else x


def feather(length: int, overlap_before: int, overlap_after: int) -> np.ndarray:
    """1-D raised-cosine ramp: rises over the leading overlap, falls over the trailing one, 1 elsewhere."""
    w = np.ones(length, np.float64)
    if overlap_before:
        d = np.arange(overlap_before)
        w[:overlap_before] = 0.5 - 0.5 * np.cos(np.pi * (d + 0.5) / overlap_before)
    if overlap_after:
        d = np.arange(overlap_after)
        w[length - overlap_after :] = np.minimum(
            w[length - overlap_after :], 0.5 + 0.5 * np.cos(np.pi * (d + 0.5) / overlap_after)
        )
    return w


def tile_weights(plan: TilePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable per-tile weights (wy [N, th], wx [N, tw]) in output pixels: raised-cosine ramps over the overlaps,
    1 elsewhere and at the canvas edges. Dividing by their sum makes them a partition of unity."""
    th, tw = plan.tile_out
    ovy, ovx = (o * plan.out_per_lat for o in plan.overlap)
    ny, nx = plan.grid
    wy = [feather(th, ovy if i > 0 else 0, ovy if i < ny - 1 else 0) for i in range(ny) for _ in range(nx)]
    wx = [feather(tw, ovx if j > 0 else 0, ovx if j < nx - 1 else 0) for _ in range(ny) for j in range(nx)]
    return torch.from_numpy(np.stack(wy)).float(), torch.from_numpy(np.stack(wx)).float()


def tile_origins(plan: TilePlan, device=None) -> torch.Tensor:
    """Top-left output-pixel (y, x) of every tile, [N, 2] int64 on `device` (built once per image, not per step)."""
    return torch.tensor([(y * plan.out_per_lat, x * plan.out_per_lat) for y, x in plan.origins()], device=device)


def blend(tiles: torch.Tensor, plan: TilePlan, weights=None) -> torch.Tensor:
    """Feathered accumulation of tiles [N, C, th, tw] into the canvas [C, CH, CW] (Triton on CUDA).

    weights: (wy, wx) from `tile_weights`, optionally with the origins from `tile_origins` as a third element, all
    on the tiles' device — what the sampler passes every step, so nothing is built or copied per step."""
    from pipeline.kernels import TorchOps, get_ops

    wy, wx, *rest = weights if weights is not None else tile_weights(plan)
    origins = rest[0] if rest else tile_origins(plan, tiles.device)
    ops = get_ops(device=tiles.device) if tiles.is_cuda else TorchOps()  # by the tensor's device, never a global
    return ops.tile_blend(tiles, wy.to(tiles.device), wx.to(tiles.device), origins.to(tiles.device), plan.canvas_hw)


def crop_tiles(canvas: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """The inverse of blend for consistent canvases: [C, CH, CW] -> [N, C, th, tw]."""
    th, tw = plan.tile_out
    return torch.stack(
        [canvas[:, y * plan.out_per_lat : y * plan.out_per_lat + th, x * plan.out_per_lat : x * plan.out_per_lat + tw]
         for y, x in plan.origins()]
    )  # fmt: skip
