"""What each item of the device check should cost on a named card: `pidray doctor --plan --card H100`.

Every estimate is scaled from the last run measured on a GPU (below) by FLOP count (`forward_flops`: a forward at
another size costs its FLOPs over the 2048² forward's) and by the card's throughput relative to that run's H200.
Each item's `need` is the time that must be left for it to start (`Check.has`): 1.5× its estimate plus 5 s, and at
least 120 s for anything that compiles with torch.compile, so an item that starts also finishes inside `--budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

# The last GPU run: NVIDIA H200, torch 2.11 + triton 3.6 (docs/performance.md, "The device check"). A 2048² flux-2k
# forward, random bf16 weights, batch 1: eager, our Triton kernels, torch.compile, fp32 weights (the precision step);
# FP8 was not measured there and is assumed to cost what the kernels do.
H200_FORWARD_MS = {"eager": 153.0, "kernels": 109.0, "compile": 103.0, "fp8": 109.0, "fp32": 1233.0}
# The diffuse stage's 4-step sampler at 2048², seconds per image at 1 / 2 / 4 tiles per network call (the same run).
H200_LOOP_S_PER_IMAGE = {1: 0.73, 2: 2.06, 4: 1.54}
# SDPA at 2048² (16,384 tokens), every backend tried once, ms: patch / pixel attention (the same run).
H200_SDPA_MS = {"patch": 133.0, "pixel": 106.0}
COMPILE_S = 90.0  # a torch.compile first call: 43 s on the H200 with a warm cache; 40-90 s expected on a fresh machine
COMPILE_NEED_S = 120.0
# Throughput relative to the H200 run: bf16 dense peak over the H200's 989 TFLOP/s, lowered for the cards with less
# memory bandwidth (the network ran at 42% of peak there: partly memory-bound). Unknown cards: the H100's.
CARDS = {"H200": 1.0, "H100": 0.8, "A100": 0.3, "L40S": 0.3, "A10": 0.1, "L4": 0.1}
PNG_S_PER_MPX = 0.4  # PIL's PNG encode (level 6) on one core of a GPU machine's CPU; the merge stage's share
GOLDEN_FIXTURES = 4  # the checkout's fixtures (flux_vae, pid, pid teacher, pixeldit) when none are found to count
BULK_IMAGES = {"flux-2k": 3, "flux-2kto4k-v1.5": 1}  # timed images per bulk case (one more warms up first); --full: 2×
BULK_CASES = (("flux-2k", 512), ("flux-2kto4k-v1.5", 1024))  # (preset, input side): 512² -> 2048², 1024² -> 4096²


def card_of(name: str | None) -> str:
    """The CARDS key a device name or --card names (case-insensitive, 'NVIDIA H100 80GB HBM3' -> 'H100')."""
    up = (name or "").upper()
    return next((k for k in sorted(CARDS, key=len, reverse=True) if k in up), "H100")


class Rates:
    """Seconds of the pieces an item is made of, on one card."""

    def __init__(self, card: str):
        from pipeline.doctor.common import forward_flops
        from pipeline.model.presets import get_preset

        self.card, self.speed = card, CARDS[card]
        self._flops = forward_flops
        self._cfg = get_preset("flux-2k").config
        self._ref = forward_flops(self._cfg, 2048, 2048, self._cfg.txt_max_length)

    def forward(self, kind: str, h: int, w: int | None = None, batch: int = 1, cfg=None) -> float:
        cfg = cfg or self._cfg
        f = self._flops(cfg, h, w or h, cfg.txt_max_length) / self._ref
        return batch * f * H200_FORWARD_MS[kind] / 1e3 / self.speed

    def loop_run(self, size: int, tiles_per_call: int, images: int = 1, kind: str = "kernels") -> float:
        """One 4-step diffuse of `images` images of one tile each at `tiles_per_call` (host time as measured)."""
        host = max(0.0, H200_LOOP_S_PER_IMAGE[tiles_per_call] - 4 * H200_FORWARD_MS["kernels"] / 1e3)
        return images * (4 * self.forward(kind, size) + host)

    def sdpa(self, which: str, size: int, calls: int) -> float:
        return calls * H200_SDPA_MS[which] / 1e3 * ((size / 2048) ** 4) / self.speed


def _item(label: str, seconds: float, compiles: bool = False) -> tuple[str, float, float]:
    need = max(COMPILE_NEED_S, 1.5 * seconds + 5) if compiles else 1.5 * seconds + 5
    return label, round(seconds, 1), round(need, 1)


@dataclass(frozen=True)
class Opts:
    """What decides a run's items: the sizes, timed repetitions, torch.compile and FP8 items, --full, the fixtures."""

    sizes: tuple[int, ...] = (2048, 3840)
    reps: int = 3
    compile: bool = True
    fp8: bool = True
    full: bool = False  # the default set plus what repeats a finding at more cost (see `items`)
    golden: tuple = ()  # fixture paths found (none: the checkout's four are assumed)


def bulk_images(name: str, full: bool) -> int:
    return BULK_IMAGES[name] * (2 if full else 1)


def items(step: str, r: Rates, o: Opts, kernel_cases: int = 8) -> list[tuple[str, float, float]]:
    """(item label, estimated seconds, need) of every item of `step`, as the step labels them. The default set fits
    420 s on an H100; `--full` adds torch.compile of the forward alone (the diffuse loop's compiled case already
    compiles the network), 4 tiles a call of 4 images (the tiled case runs 4 a call) and FP8 tiled, and twice the
    bulk images."""
    sizes, reps, compile, fp8, golden = o.sizes, o.reps, o.compile, o.fp8, o.golden
    size = sizes[0]
    if step == "versions":
        return [_item("versions", 8.0), _item("sdpa patch attention", 1 + r.sdpa("patch", size, reps + 2)),
                _item("sdpa pixel attention", 1 + r.sdpa("pixel", size, reps + 2))]  # fmt: skip
    if step == "golden":
        names = [f.name for f in golden] if golden else [f"fixture {i + 1}" for i in range(GOLDEN_FIXTURES)]
        return [_item(n, 4.0) for n in names]
    if step == "kernels":  # autotuning compiles up to 4 configs a key (~1 s each on a fresh machine)
        out = [_item(f"agreement {dt}", kernel_cases * 3 * 1.0) for dt in ("float32", "bfloat16")]
        out.append(_item("offsets past 2^31 elements", 15.0))
        return out + [_item(f"speed {size}²", kernel_cases * (3.0 + 0.01 * (reps + 2)))]
    if step == "graph":
        return [_item("small 96² -> 384²", 10.0)]
    if step == "precision":
        kinds = ("fp32", "kernels", "kernels", "fp8")  # fp32, bf16 weights, fp32 under autocast (~bf16), FP8
        fwd = sum(r.forward(k, size) for k in kinds) * (1 + reps)
        pid = [f.name for f in golden if f.name.startswith("pid")] if golden else ["pid fixture 1", "pid fixture 2"]
        return [_item(n, 5.0) for n in pid] + [_item(f"random weights {size}²", 10.0 + fwd)]
    if step == "weights":
        return [_item("weights", 2.0)]
    if step == "hot_path":
        return [_item("hot_path", 8.0)]  # on the CPU: 2.8 s on a 2-core machine
    if step == "forward":
        out = []
        for k, s in enumerate(sizes):
            names = ["eager", "kernels"] + (["compile"] if compile and o.full and k == 0 else [])
            names += ["fp8"] if fp8 else []
            for n in names:  # the first call, a warm-up, `reps` timed, the profiler's (eager); build on the first
                sec = (reps + 3) * r.forward(n, s) + (COMPILE_S if n == "compile" else 0) + (4.0 if k == 0 else 0)
                out.append(_item(f"{s}² {n}", sec, compiles=n == "compile"))
        return out
    if step == "diffuse_loop":
        runs = reps + 0.25  # the warm-up is one step
        out = [_item(f"{size}² batch {b}", runs * r.loop_run(size, b, b)) for b in loop_batches(o.full)]
        out.append(_item(f"tiled 2x2 of {size}² (fusion) per image", 4.0 + runs * r.loop_run(size, 4, 4)))
        if fp8:
            out.append(_item(f"fp8 {size}² batch 1", 4.0 + runs * r.loop_run(size, 1, 1, "fp8")))
            if o.full:
                out.append(_item(f"fp8 tiled 2x2 of {size}²", runs * r.loop_run(size, 4, 4, "fp8")))
        if compile:  # one compiled graph: one tile a call (the tiled case at 4 a call is another compile)
            out.append(_item(f"compile {size}² batch 1", 4.0 + COMPILE_S + runs * r.loop_run(size, 1, 1, "compile"),
                             compiles=True))  # fmt: skip
        return out
    if step == "bulk":
        return [_item(label, sec) for label, sec in bulk_estimates(r, o.full)]
    raise KeyError(step)


def loop_batches(full: bool) -> tuple[int, ...]:
    return (1, 2, 4) if full else (1, 2)


def bulk_label(preset: str, side: int, out_side: int) -> str:
    return f"{preset} {side}² -> {out_side}²"


def bulk_estimates(r: Rates, full: bool = False) -> list[tuple[str, float]]:
    """Seconds of each bulk case: the models built with random weights (network, VAE encoder, Gemma-2-2B), then one
    warm-up image and the timed stream, each image: its tiles' 4 sampler steps, the VAE encode, the PNG encode."""
    from pipeline.model.presets import get_preset
    from pipeline.stages.common import UpscaleOptions
    from pipeline.stages.encode import plan_for

    out = []
    for name, side in BULK_CASES:
        p = get_preset(name)
        plan = plan_for(p, UpscaleOptions(), (side, side))
        th, tw = plan.tile_out
        host = max(0.0, H200_LOOP_S_PER_IMAGE[1] - 4 * H200_FORWARD_MS["kernels"] / 1e3)
        per_image = plan.n_tiles * (4 * r.forward("kernels", th, tw, cfg=p.config) + host)
        per_image += 0.05 * (side / 512) ** 2 / r.speed  # the VAE encode (fp32, ~0.1 TFLOP per 512² input)
        per_image += PNG_S_PER_MPX * plan.out_hw[0] * plan.out_hw[1] / 1e6
        out.append((bulk_label(name, side, plan.out_hw[0]), 10.0 + (bulk_images(name, full) + 1) * per_image))
    return out


def table(steps: list[str], card: str, o: Opts) -> list:
    """[(step, item, seconds, need)] for the steps wanted, in order."""
    r = Rates(card)
    return [(s, *it) for s in steps for it in items(s, r, o)]


def render(rows: list, card: str, budget: float) -> str:
    lines = [f"pidray doctor plan on {card} (estimates from the last measured H200 run, scaled by FLOPs and card)", "",
             f"{'step':<13} {'item':<44} {'est s':>7} {'need s':>7}"]  # fmt: skip
    totals: dict[str, float] = {}
    for step, label, sec, need in rows:
        totals[step] = totals.get(step, 0.0) + sec
        lines.append(f"{step:<13} {label:<44} {sec:>7.1f} {need:>7.1f}")
    lines += ["", "per step: " + ", ".join(f"{s} {t:.0f} s" for s, t in totals.items())]
    total = sum(totals.values())
    lines.append(f"total: {total:.0f} s of a {budget:.0f} s budget ({'fits' if total <= budget else 'does NOT fit'})")
    return "\n".join(lines)
