"""What `--stop-at K` saves: the generator's network calls and seconds per image at K = N (the whole loop) and at the
official examples' K, measured on a tiny random Z-Image pipeline (its real classes) on this machine. The calls are
what a real model runs too; the seconds of a tiny model on a CPU are only its share of the loop. Prints one line per
K with the median of `runs`; not a timed test.

    PYTHONPATH=.:tests python tests/bench_stop_at.py [STEPS=50] [K ...=46 38]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(steps: int = 50, ks: tuple[int, ...] = (46, 38), runs: int = 5) -> None:
    import diffusers

    from pipeline.generators import GENERATORS
    from pipeline.stages.ldm import generator_latent

    from conftest import make_tiny_zimage

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    folder = make_tiny_zimage(Path(tempfile.mkdtemp(prefix="pidray-bench-")))
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    calls = [0]
    pipe.transformer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    spec = GENERATORS["zimage"]
    print(f"tiny Z-Image, {steps} steps, 64x64, cfg 0, median of {runs} (torch threads {torch.get_num_threads()})")
    generator_latent(
        pipe,
        spec,
        (64, 64),
        steps,
        None,
        prompt="a cat",
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=64,
    )  # warm-up, not timed
    base = None
    for k in (steps, *ks):
        times = []
        for _ in range(runs):
            calls[0] = 0
            t0 = time.perf_counter()
            generator_latent(pipe, spec, (64, 64), steps, k, prompt="a cat", guidance_scale=0.0,
                             generator=torch.Generator().manual_seed(0), max_sequence_length=64)  # fmt: skip
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        base = base or (t, calls[0])
        print(f"K={k:3d}: {calls[0]:3d} transformer calls ({calls[0] / base[1]:.2f}x of K=N), {t:.3f} s "
              f"({t / base[0]:.2f}x of K=N)")  # fmt: skip


if __name__ == "__main__":
    a = [int(x) for x in sys.argv[1:]]
    main(a[0] if a else 50, tuple(a[1:]) or (46, 38))
