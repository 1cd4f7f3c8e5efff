"""The doctor's harness: the report rewritten after every item, and what every step gets (`Check`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from pipeline.doctor.common import tiny_config


class Report:
    """Everything measured so far, rewritten to `out/doctor.json` and `out/doctor.md` after every item."""

    def __init__(self, out: Path | None):
        self.out = out
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
        if out:
            out.mkdir(parents=True, exist_ok=True)

    def put(self, step: str, key: str, value) -> None:
        self.data["steps"].setdefault(step, {})[key] = value
        self.flush()

    def flush(self) -> None:
        if not self.out:
            return
        texts = {"doctor.json": json.dumps(self.data, indent=1, default=str), "doctor.md": self.markdown()}
        for name, text in texts.items():
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def markdown(self) -> str:
        lines = [f"# pidray doctor — {self.data.get('device', '?')}", "", f"started {self.data['started']}", ""]
        for step, items in self.data["steps"].items():
            lines += [f"## {step}", ""]
            for k, v in items.items():
                if isinstance(v, dict):
                    v = ", ".join(f"{kk} {_fmt(vv)}" for kk, vv in v.items())
                lines.append(f"- {k}: {_fmt(v)}")
            lines.append("")
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Check:
    """What every step gets: the device, dtype, config, sizes, the time budget, and the report."""

    def __init__(self, args):
        self.smoke = args.smoke
        want = "cpu" if args.smoke else args.device
        self.device = torch.device(want if want != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        default = "32" if args.smoke else "2048,3840" if self.device.type == "cuda" else "256"  # a CPU: no 2K tiles
        self.sizes = [int(s) for s in (args.sizes or default).split(",")]
        self.reps = args.reps if args.reps else (1 if args.smoke else 5)
        self.compile = not args.no_compile and not args.smoke
        self.fp8 = not getattr(args, "no_fp8", False)  # the `--precision fp8` items
        self.deadline = time.time() + args.budget
        self.golden = args.golden
        self.report = Report(Path(args.out) if args.out else None)
        self.report.data["device"] = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                                      else f"cpu ({os.cpu_count()} cores)")  # fmt: skip
        if args.smoke:
            self.cfg = tiny_config()
        else:
            from pipeline.model.presets import get_preset

            self.cfg = get_preset("flux-2k").config

    def left(self) -> float:
        return self.deadline - time.time()

    def has(self, seconds: float) -> bool:
        """True when at least `seconds` remain (a smoke run never skips)."""
        return self.smoke or self.left() > seconds
