"""How few pixels can six tile shapes diffuse? (a measuring script, not a test; prints, asserts nothing)

    python tests/bench_buckets.py

For `flux-2k` and `flux-2kto4k-v1.5` over `pipeline.tiling.COMMON_SIZES`: pixels diffused per output pixel with the
even split (one shape per image size), with `--tile-buckets` as shipped, and with the best set of MAX_BUCKET_SHAPES
tile shapes (each image taking the shape that diffuses it with the fewest pixels, overlaps of at least the preset's)
that a search finds: every set when there are under 3 million of them, else a greedy pick improved by swaps until no
single swap helps. Tile sides are multiples of 256, then 128, output pixels inside the preset's envelope.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model.presets import get_preset  # noqa: E402
from pipeline.tiling import (  # noqa: E402
    COMMON_SIZES,
    MAX_BUCKET_SHAPES,
    _shape_cost,
    cheapest_rows,
    diffused_pixels,
    plan_tiles,
)


def best_shapes(cost: np.ndarray, k: int) -> list[int]:
    """Rows of cost [shape, image] whose per-image minimum sums lowest, k of them: every set when there are few
    enough, else the tiler's own local search."""
    n = len(cost)
    if math.comb(n, k) >= 3_000_000:
        return cheapest_rows(cost, k)
    best, best_sum = None, math.inf
    combos = itertools.combinations(range(n), k)
    while chunk := list(itertools.islice(combos, 200_000)):
        arr = np.array(chunk)
        sums = cost[arr].min(axis=1).sum(axis=1)
        i = int(sums.argmin())
        if sums[i] < best_sum:
            best, best_sum = list(arr[i]), sums[i]
    return best


def main() -> None:
    for name in ("flux-2k", "flux-2kto4k-v1.5"):
        p = get_preset(name)
        unit, scale, ov = p.lq_unit, p.config.sr_scale, p.tile_overlap
        per_lat = unit * scale
        lat = [(-(-h // unit), -(-w // unit)) for w, h in COMMON_SIZES]
        out_px = sum(h * w for h, w in lat)

        def ratio(buckets: bool) -> tuple[float, int]:
            kw = dict(unit=unit, sr_scale=scale, patch=p.config.patch_size, tile_out=p.envelope[1],
                      tile_min_out=p.envelope[0], overlap=ov, max_output_side=1 << 20, buckets=buckets)  # fmt: skip
            plans = [plan_tiles((h, w), **kw) for w, h in COMMON_SIZES]
            total = sum(map(diffused_pixels, plans)) / sum(pl.out_hw[0] * pl.out_hw[1] for pl in plans)
            return total, len({pl.tile for pl in plans})

        print(f"{name}: even split {ratio(False)[0]:.3f} ({ratio(False)[1]} shapes), "
              f"--tile-buckets {ratio(True)[0]:.3f} ({ratio(True)[1]} shapes)")  # fmt: skip
        lo, hi = p.envelope[0] // per_lat, p.envelope[1] // per_lat
        for step_px in (256, 128):
            step = step_px // per_lat
            sides = sorted({*range(-(-lo // step) * step, hi, step), hi})
            shapes = [(a, b) for a in sides for b in sides]
            cost = np.array([[_shape_cost(img, s, ov)[0] for img in lat] for s in shapes], float)
            pick = best_shapes(cost, MAX_BUCKET_SHAPES)
            got = cost[pick].min(0).sum() / out_px
            how = "every set" if math.comb(len(shapes), MAX_BUCKET_SHAPES) < 3_000_000 else "local search"
            print(
                f"  best {MAX_BUCKET_SHAPES} shapes, sides in {step_px}-px steps ({how}): {got:.3f} — "
                + ", ".join(f"{a * per_lat}x{b * per_lat}" for a, b in (shapes[i] for i in pick))
            )


if __name__ == "__main__":
    main()
