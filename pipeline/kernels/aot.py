"""Ahead-of-time compile of every kernel config a launch may try, for a GPU target, on a machine without a GPU.

Triton compiles to PTX and runs the bundled ptxas without a device, so the autotune space can be checked on the CPU:
`python -m pipeline.kernels.aot` compiles each config for sm_90 at the row widths the released networks use and
reports seconds and spilled bytes per config (a test fails on > 30 s or any spill). Run it without
TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pipeline.kernels import OPS
from pipeline.kernels._common import all_configs, tuning_space

FLOAT_ARGS = {"eps"}
INT_ARGS = {"D", "N", "C", "H"}  # upper-case sizes; every other upper-case argument is a pointer
FP32_POINTERS = {"COS", "SIN"}


def _cases():
    """(op, constexprs, row elements) for every autotuned op of `OPS`, at the widths the released networks use."""
    for op in OPS:
        if op.aot_cases is not None:
            for constexprs, row_elems in op.aot_cases(triton.next_power_of_2):
                yield op, constexprs, row_elems


def _signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name.isupper() and name not in INT_ARGS:
            sig[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
        else:
            sig[name] = "i32"
    return sig


def _spills(ptx: str, arch: int) -> int:
    """Bytes of stack frame + spill stores + loads that ptxas (the one Triton uses for `arch`) reports."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {(out.stderr or out.stdout)[-500:]}")
    text = out.stderr + out.stdout
    return sum(int(n) for n in re.findall(r"(\d+) bytes (?:stack frame|spill stores|spill loads)", text))


def compile_all(arch: int = 90, budget_s: float = 60.0) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    results = []
    for op, constexprs, row_elems in _cases():
        name = op.name
        fn = getattr(sys.modules[op.reference[next(iter(op.reference))].__module__], op.kernel).fn
        space = tuning_space(all_configs(*op.candidates), row_elems)
        for cfg in space:
            t0 = time.time()
            src = ASTSource(fn, _signature(fn, constexprs), constexprs={**constexprs, **cfg.kwargs})
            compiled = triton.compile(src, target=target, options={"num_warps": cfg.num_warps})
            seconds = time.time() - t0
            config = {**cfg.kwargs, "warps": cfg.num_warps}
            spills = _spills(compiled.asm["ptx"], arch)
            results.append({"kernel": name, "row_elems": row_elems, "config": config, "seconds": round(seconds, 2),
                            "spill_bytes": spills})  # fmt: skip
            if seconds > budget_s:
                return results
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the AOT compile needs the real compiler")
    print(json.dumps(compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)))
