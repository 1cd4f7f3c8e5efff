"""The device check: `pidray doctor --gpu`, or `python -m pipeline.doctor` where only pipeline/ and torch exist.

This module is the harness (steps list, run, CLI); the steps live beside it: `device_steps.py` (versions, kernels,
forward), `loop_steps.py` (diffuse_loop, golden, graph), `precision_steps.py` (precision, weights), `hot_path.py`
(what a sampler step costs outside the network, measured on the CPU), `common.py` and `harness.py`.

GPU machines are lent for minutes, have no package registry, and have torch + triton but no Ray, boto3 or FastAPI:
this module imports nothing outside `pipeline/` and the standard library besides torch (triton where present). It
runs a fixed list of steps, each guarded (an error is recorded and the next step runs) and each checked against the
time budget before it starts and between its items; the report (`doctor.json` + `doctor.md` in `--out`) is
rewritten after every item, so a run cut short still leaves everything it measured.

Steps: `versions` (torch/triton/CUDA, the card, which SDPA backends run at our attention shapes); `kernels` (every
Triton kernel vs its torch reference on the device, fp32 and bf16, odd sizes, offsets past 2^31 elements, and
speed at the network's shapes); `forward` (the released flux-2k network with random weights at 2048² and 3840²:
eager vs our kernels vs torch.compile vs FP8 — agreement, ms, peak memory vs `memory.py`, MFU, the SDPA kernels
the profiler saw); `diffuse_loop` (the real 4-step sampler of the diffuse stage at 1/2/4 tiles per call and a
2×2-tile image with fusion, also with FP8 and compiled, every (batch, shape) warmed first: s/image and the host's
share of a step); `golden` (the parity fixtures with the networks on the device); `graph` (the bundled `small`
preset through the stage graph on the device vs the CPU); `precision` (bf16 weights vs fp32 weights under bf16
autocast vs FP8, against fp32, on the golden fixtures and the full-depth network); `hot_path` (host RNG draws,
host-to-device copies and syncs per sampler step, autotune keys per batch, tile shapes per preset). `--smoke` runs
every step on the CPU with a tiny config in seconds (a test does, with Ray, boto3 and FastAPI made unimportable).
FLOPs are counted analytically (`forward_flops`): 2·M·N·K per matmul and 4·N²·d per attention; element-wise work
is not counted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

# Each step and the module beside this one that defines it (step_<name>). The modules load torch: a step's module is
# imported when the step runs, so the options (`pidray doctor --help`, a usage error) need no torch.
STEPS = {"versions": "device_steps", "kernels": "device_steps", "forward": "device_steps",
         "diffuse_loop": "loop_steps", "golden": "loop_steps", "graph": "loop_steps",
         "precision": "precision_steps", "hot_path": "hot_path", "weights": "precision_steps"}  # fmt: skip
# The API, imported on first use: name -> its module
_API = {"build_net": "common", "forward_flops": "common", "kernel_cases": "common", "tiny_config": "common",
        "Check": "harness", "Report": "harness"}  # fmt: skip


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f"pipeline.doctor.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def step(name: str):
    """The function that runs step `name`: step(c, put)."""
    return getattr(importlib.import_module(f"pipeline.doctor.{STEPS[name]}"), f"step_{name}")


def run(args) -> dict:
    from pipeline.doctor.harness import Check

    c = Check(args)
    wanted = args.steps.split(",") if args.steps else list(STEPS)
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:  # a usage error: one line, exit 2, as every pidray command
        print(f"pidray doctor: unknown step(s) {unknown}; steps: {', '.join(STEPS)}", file=sys.stderr)
        raise SystemExit(2)
    t_all = time.time()
    for name in wanted:
        if not c.has(10):
            c.report.put(name, "status", "skipped: time budget")
            continue
        t0 = time.time()
        try:
            step(name)(c, lambda k, v, _n=name: c.report.put(_n, k, v))
            status = "ok"
        except Exception as e:  # a step's failure is a finding: recorded, and the next step runs
            status = f"error: {type(e).__name__}: {e}"
            c.report.put(name, "traceback", traceback.format_exc(limit=6))
        c.report.put(name, "status", status)
        c.report.put(name, "seconds", round(time.time() - t0, 1))
        print(f"doctor: {name}: {status} ({time.time() - t0:.1f}s)", flush=True)
    c.report.data["wall_s"] = round(time.time() - t_all, 1)
    c.report.flush()
    return c.report.data


def add_args(ap) -> None:
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU with a tiny config (seconds)")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of: {', '.join(STEPS)}")
    ap.add_argument("--sizes", default=None, help="output sides for kernels/forward/loop (default 2048,3840)")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the forward step")
    ap.add_argument("--no-fp8", action="store_true", help="leave the FP8 (`--precision fp8`) items out")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds: steps that would run past it are skipped")
    ap.add_argument("--golden", default=None, help="folder of golden fixtures (default: a source checkout's, if "
                    "any; without fixtures the golden step is skipped)")  # fmt: skip
    ap.add_argument("--out", default=None, help="report folder (doctor.json, doctor.md), rewritten as it goes "
                    "(default: pidray/doctor in your cache folder, ~/.cache or $XDG_CACHE_HOME)")  # fmt: skip


def default_out() -> str:
    """Where the report goes unless --out says: the user's cache folder, never the current one."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pidray", "doctor")


def cmd(args) -> int:
    from pipeline.doctor.harness import Report

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
