"""The device check: `pidray doctor --gpu`, or `python -m pipeline.doctor` where only pipeline/ and few packages exist.

This module is the harness (steps list, run, CLI); the steps live beside it: `device_steps.py` (versions, kernels,
forward), `loop_steps.py` (golden, graph, diffuse_loop), `precision_steps.py` (precision, weights), `hot_path.py`
(what a sampler step costs outside the network, measured on the CPU), `bulk.py` (a stream of images through the
real stage graph), `plan.py` (each item's estimated seconds on a card: `--plan`), `common.py` and `harness.py`.

GPU machines are lent for minutes, have no package registry, and have python, torch + triton, numpy, Pillow,
safetensors, pyarrow and transformers (with what it requires) but no Ray, boto3, FastAPI, diffusers or scikit-image:
this module imports nothing outside `pipeline/` and the standard library besides torch, triton (where present),
numpy, Pillow, safetensors and transformers (the bulk step's caption encoder class). The steps run in order,
correctness first (versions, golden, kernels, graph, precision, weights, hot_path), then speed (forward,
diffuse_loop, bulk). Every item of a step (a network at a size, a loop case, a precision variant, a fixture) is
guarded on its own: its error is recorded with the innermost frames of its traceback and the next item runs. An
item starts only when the time it needs on this card (`plan.py`: estimated from FLOP counts and the last measured
rates; at least 120 s for a compile) is left of `--budget`; the default steps are estimated at about 400 s on an
H100, inside one 600 s call. The report (`doctor.json` + `doctor.md` in `--out`) is rewritten after every item, so a
run cut short still leaves everything it measured.

Steps: `versions` (torch/triton/CUDA, the card, which SDPA backends run at our attention shapes); `golden` (the
parity fixtures with the networks on the device; `--golden DIR`, else a checkout's `.gpu/` or `shared/golden` in or
beside it; fixtures asked for and missing fail the step); `kernels` (every Triton kernel vs its torch reference on
the device, fp32 and bf16, odd sizes, offsets past 2^31 elements, and speed at the network's shapes); `graph` (the
bundled `small` preset through the stage graph on the device vs the CPU); `precision` (bf16 weights vs fp32 weights
under bf16 autocast vs FP8, against fp32, on the golden fixtures and the full-depth network); `weights` (the
deployment's weights are where it looks); `hot_path` (host RNG draws, host-to-device copies and syncs per sampler
step, autotune keys per batch, tile shapes per preset); `forward` (the released flux-2k network with random weights
at 2048² and 3840²: eager vs our kernels vs FP8, and with `--full` torch.compile — agreement, ms, peak memory vs
`memory.py`, MFU, the SDPA kernels the profiler saw); `diffuse_loop` (the real 4-step sampler of the diffuse stage at
1 and 2 tiles per call (`--full`: 4) and a 2×2-tile image with fusion, FP8 and compiled at one tile a call, every
(batch, shape) warmed first: s/image and the host's share of a step); `bulk` (the upscale graph over a stream of
images with every model at full size and random weights, flux-2k 512² -> 2048² and flux-2kto4k-v1.5 1024² -> 4096²:
images/s, the GPU's busy share, the host's share per stage, peak memory, the cost of 1,000 images). `--smoke` runs
every step and item on the CPU with tiny configs (a test does, with everything the GPU machines lack unimportable).
FLOPs are counted analytically (`forward_flops`): 2·M·N·K per matmul and 4·N²·d per attention; element-wise work
is not counted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

# Each step and the module beside this one that defines it (step_<name>), in the order they run: the correctness
# checks first (cheap, and what a short run must not miss), then speed. The modules load torch: a step's module is
# imported when the step runs, so the options (`pidray doctor --help`, a usage error, `--plan`) need no GPU.
STEPS = {"versions": "device_steps", "golden": "loop_steps", "kernels": "device_steps", "graph": "loop_steps",
         "precision": "precision_steps", "weights": "precision_steps", "hot_path": "hot_path",
         "forward": "device_steps", "diffuse_loop": "loop_steps", "bulk": "bulk"}  # fmt: skip
DEFAULT_BUDGET_S = 480.0  # one 600 s call: the default steps' 420 s estimate on an H100, room for start-up
DEFAULT_PRICE_PER_GPU_HOUR = 3.0  # US dollars: an assumed on-demand H100 price; pass your own
# The API, imported on first use: name -> its module
_API = {"build_net": "common", "forward_flops": "common", "kernel_cases": "common", "tiny_config": "common",
        "Check": "harness", "Report": "harness", "Skipped": "harness", "innermost": "harness"}  # fmt: skip


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f"pipeline.doctor.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def step(name: str):
    """The function that runs step `name`: step(c, put)."""
    return getattr(importlib.import_module(f"pipeline.doctor.{STEPS[name]}"), f"step_{name}")


def wanted_steps(args) -> list[str]:
    wanted = args.steps.split(",") if args.steps else list(STEPS)
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:  # a usage error: one line, exit 2, as every pidray command
        print(f"pidray doctor: unknown step(s) {unknown}; steps: {', '.join(STEPS)}", file=sys.stderr)
        raise SystemExit(2)
    return wanted


def run(args) -> dict:
    from pipeline.doctor.harness import Check, Skipped, innermost

    c = Check(args)
    wanted = wanted_steps(args)
    c.report.data["card"] = c.card
    t_all = time.time()
    for name in wanted:
        c.step = name
        put = lambda k, v, _n=name: c.report.put(_n, k, v)  # noqa: E731
        if not c.has(10):
            put("status", "skipped: time budget")
            continue
        t0 = time.time()
        try:
            step(name)(c, put)
            failed = c.errors.get(name, [])
            status = f"error: {len(failed)} item(s) failed: {', '.join(failed)}" if failed else "ok"
        except Skipped as e:
            status = f"skipped: {e}"
        except Exception as e:  # a step's failure is a finding: recorded, and the next step runs
            status = f"error: {type(e).__name__}: {str(e)[:800]}"
            put("traceback", innermost(e))
        put("status", status)
        put("seconds", round(time.time() - t0, 1))
        if not c.smoke:  # beside the plan's estimate on this card: what the next plan's rates should learn from
            put("estimate_s", round(sum(sec for sec, _ in c.planned(name).values()), 1))
        print(f"doctor: {name}: {status} ({time.time() - t0:.1f}s)", flush=True)
    c.report.data["wall_s"] = round(time.time() - t_all, 1)
    c.report.flush()
    return c.report.data


class _PlanAction(argparse.Action):
    """--plan: also names every step unless --steps did, so that a front end that picks a default subset when no
    step is named (`pidray doctor`: versions only) plans the whole check."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.plan = True
        if not namespace.steps:
            namespace.steps = ",".join(STEPS)


def add_args(ap) -> None:
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU with a tiny config (seconds)")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of: {', '.join(STEPS)}")
    ap.add_argument("--sizes", default=None, help="output sides for kernels/forward/loop (default 2048,3840)")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (median; default 3, 1 in a smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the forward step")
    ap.add_argument("--no-fp8", action="store_true", help="leave the FP8 (`--precision fp8`) items out")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds: an item is started only when "
                    "the time it needs on this card is left (see --plan)")  # fmt: skip
    ap.add_argument("--golden", default=None, help="folder of golden parity fixtures (default: those that come "
                    "with a source checkout, if any; none found: the golden step is skipped; none in DIR: it "
                    "fails)")  # fmt: skip
    ap.add_argument("--full", action="store_true", help="also what repeats a finding at more cost: torch.compile "
                    "of the forward alone, 4 images a call, FP8 tiled, twice the bulk images (over 420 s on an "
                    "H100)")  # fmt: skip
    ap.add_argument("--plan", action=_PlanAction, nargs=0, default=False,
                    help="print each step's estimated seconds on --card and exit (default: every step)")  # fmt: skip
    ap.add_argument("--card", default=None, help="the card --plan estimates for (H100, H200, A100, L40S, L4; "
                    "default: this machine's, else H100)")  # fmt: skip
    ap.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR, help="US dollars, for "
                    f"the bulk step's cost of 1,000 images (default {DEFAULT_PRICE_PER_GPU_HOUR:.2f}, an assumed "
                    "on-demand H100 price)")  # fmt: skip
    ap.add_argument("--out", default=None, help="report folder (doctor.json, doctor.md), rewritten as it goes "
                    "(default: pidray/doctor in your cache folder, ~/.cache or $XDG_CACHE_HOME)")  # fmt: skip


def default_out() -> str:
    """Where the report goes unless --out says: the user's cache folder, never the current one."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pidray", "doctor")


def plan_table(args) -> str:
    """The --plan table: each wanted step's items with their estimated seconds and needs on --card."""
    import pipeline.doctor.plan as p
    from pipeline.doctor.harness import default_reps, default_sizes, golden_files

    card = p.card_of(args.card or "H100")
    sizes = [int(s) for s in (args.sizes or default_sizes(False, True)).split(",")]
    reps = args.reps or default_reps(False)
    golden = golden_files(args.golden, missing_ok=True)
    o = p.Opts(tuple(sizes), reps, not args.no_compile, not args.no_fp8, args.full, tuple(golden))
    rows = p.table(wanted_steps(args), card, o)
    return p.render(rows, card, args.budget)


def cmd(args) -> int:
    from pipeline.doctor.harness import Report

    if getattr(args, "plan", False):
        print(plan_table(args))
        return 0
    if args.out is None:  # "" writes no report
        args.out = default_out()
    rep = run(args)
    md = Report(None)
    md.data = rep
    print(md.markdown())
    bad = [f"{s}: {v['status']}" for s, v in rep["steps"].items() if not str(v.get("status", "")).startswith(
        ("ok", "skipped"))] + rep.get("failures", [])  # fmt: skip
    for b in bad:
        print(f"doctor: FAILED {b}")
    if args.out:
        print(f"doctor: report in {os.path.abspath(args.out)} (doctor.json, doctor.md)")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.doctor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_args(ap)
    return cmd(ap.parse_args(argv))
