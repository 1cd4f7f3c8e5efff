"""The doctor's harness: the report rewritten after every item, and what every step gets (`Check`)."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch

from pipeline.doctor.common import tiny_config

TRACE_FRAMES = 8  # innermost frames kept of an error's traceback (and of each exception it was raised from)


class Skipped(Exception):
    """A step with nothing to check on this machine: its status says why (`skipped: ...`), not an error."""


def innermost(e: BaseException, frames: int = TRACE_FRAMES) -> str:
    """e's traceback with the innermost `frames` frames of it and of every exception it chains to: where it was
    raised (a kernel, `fp8.py`), not the harness's frames that called the step."""
    te = traceback.TracebackException.from_exception(e)
    seen, todo = set(), [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        t.stack = traceback.StackSummary.from_list(list(t.stack)[-frames:])
        todo += [x for x in (t.__cause__, t.__context__) if x is not None]
    return "".join(te.format())


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


def default_sizes(smoke: bool, cuda: bool) -> str:
    return "32" if smoke else "2048,3840" if cuda else "256"  # a CPU: no 2K tiles


def default_reps(smoke: bool) -> int:
    return 1 if smoke else 3


class Check:
    """What every step gets: the device, dtype, config, sizes, the time budget, the items' needs, and the report."""

    def __init__(self, args):
        self.smoke = args.smoke
        want = "cpu" if args.smoke else args.device
        self.device = torch.device(want if want != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.sizes = [int(s) for s in (args.sizes or default_sizes(args.smoke, self.device.type == "cuda")).split(",")]
        self.reps = args.reps if args.reps else default_reps(args.smoke)
        self.compile = not args.no_compile and not args.smoke
        self.fp8 = not getattr(args, "no_fp8", False)  # the `--precision fp8` items
        self.full = bool(getattr(args, "full", False)) or args.smoke  # a smoke run runs every item
        self.deadline = time.time() + args.budget
        self.golden = args.golden
        self.price = getattr(args, "price_per_gpu_hour", None)
        self.report = Report(Path(args.out) if args.out else None)
        self.report.data["device"] = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                                      else f"cpu ({os.cpu_count()} cores)")  # fmt: skip
        from pipeline.doctor.plan import card_of

        self.card = card_of(getattr(args, "card", None) or self.report.data["device"])
        self.step = ""  # the step running (set by `run`)
        self.errors: dict[str, list[str]] = {}  # step -> labels of its items that raised
        self._needs: dict[str, dict[str, tuple[float, float]]] = {}
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

    def planned(self, step: str) -> dict[str, tuple[float, float]]:
        """label -> (estimated seconds, need) of each item of `step` on this card (`pipeline.doctor.plan`)."""
        if step not in self._needs:
            from pipeline.doctor.plan import Rates, items

            try:
                found = items(step, Rates(self.card), self.opts())
            except KeyError:
                found = []
            self._needs[step] = {lab: (sec, need) for lab, sec, need in found}
        return self._needs[step]

    def need(self, label: str, default: float = 30.0) -> float:
        """The seconds item `label` of the running step needs to start."""
        return self.planned(self.step).get(label, (0.0, default))[1]

    def opts(self):
        """This run's choices as `pipeline.doctor.plan` reads them."""
        from pipeline.doctor.plan import Opts

        return Opts(tuple(self.sizes), self.reps, self.compile, self.fp8, self.full,
                    tuple(self.golden_files(missing_ok=True)))  # fmt: skip

    def item(self, put, label: str, fn, need: float | None = None):
        """Run one item of the step: skipped (and said so) when the budget has less than its need left; an error is
        recorded under its label with the innermost frames of its traceback, and the step's other items still run.
        Returns fn's result, or None when skipped or failed."""
        need = self.need(label) if need is None else need
        if not self.has(need):
            put(label, f"skipped: time budget ({self.left():.0f} s left, needs {need:.0f} s)")
            return None
        try:
            return fn()
        except Exception as e:  # one item's failure is a finding: the step goes on with its next item
            put(label, {"error": f"{type(e).__name__}: {str(e)[:800]}", "traceback": innermost(e)})
            self.errors.setdefault(self.step, []).append(label)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def golden_files(self, missing_ok: bool = False) -> list[Path]:
        return golden_files(self.golden, missing_ok)


def golden_files(golden: str | None, missing_ok: bool = False) -> list[Path]:
    """The golden fixtures: `--golden DIR` (asked for: none there is an error), else the first of a source
    checkout's places that has some (`.gpu/` here or in the checkout, `shared/golden` in or beside it)."""
    if golden:
        folder = Path(golden)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not files and not missing_ok:
            raise FileNotFoundError(f"--golden {golden}: no *.safetensors fixtures there")
        return files
    for folder in golden_places():
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if files:
            return files
    return []


def golden_places() -> list[Path]:
    """Where a source checkout keeps the golden fixtures, when --golden names none."""
    root = Path(__file__).resolve().parents[2]  # pipeline/doctor/harness.py -> the checkout
    return [Path(".gpu"), root / ".gpu", root / "shared" / "golden", root.parent / "shared" / "golden"]
