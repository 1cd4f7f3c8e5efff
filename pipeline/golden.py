"""Verifier for golden fixtures: tensors produced by the official PiD code (format: shared/golden/README.md).

A fixture is a safetensors file with `config` JSON metadata, `net.*` (or `encoder.*`) weights,
`input.*` tensors and `expected.*` tensors. Its kind is recognised from its tensors; each expected
tensor is recomputed through the same loading path as a real checkpoint and compared by max abs
error, against the fixture's own `tolerance` metadata (JSON: expected tensor -> max abs error, `default` for the
rest; 1e-4 when absent), which every report line prints. A kind we do not know, or an expected tensor we cannot
recompute ("not checked: expected.X"), fails the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

TOLERANCE = 1e-4  # the format's default max abs error (shared/golden/README.md)


@dataclass
class Check:
    name: str
    error: float | None  # None: not computed
    note: str = ""
    tolerance: float = TOLERANCE  # the fixture's stated bound for this tensor

    @property
    def ok(self) -> bool:
        return self.error is not None and self.error <= self.tolerance


def tolerances(meta: dict) -> dict[str, float]:
    """The fixture's `tolerance` metadata: expected tensor name (or `default`) -> max abs error. ValueError when it
    is not a JSON object of finite, non-negative numbers."""
    from pipeline.errors import is_number

    raw = meta.get("tolerance")
    if raw is None:
        return {}
    try:
        table = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"`tolerance` metadata is not JSON ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f"`tolerance` metadata must be a JSON object, got {type(table).__name__}")
    out = {}
    for name, value in table.items():
        ok = is_number(value) and value >= 0
        if not ok:
            raise ValueError(f"`tolerance` for {name!r} must be a finite number >= 0, got {value!r}")
        out[str(name)] = float(value)
    return out


@dataclass
class FixtureReport:
    path: str
    kind: str
    checks: list[Check] = field(default_factory=list)
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem and bool(self.checks) and all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        head = f"{Path(self.path).name}: kind={self.kind}"
        if self.problem:
            return [f"{head}  FAIL: {self.problem}"]
        out = [head]
        for c in self.checks:
            if c.error is None:
                out.append(f"  {c.name:28s} FAIL  {c.note}")
            else:
                verdict = "ok" if c.ok else "FAIL"
                line = f"  {c.name:28s} max_abs_err={c.error:.3e} (tolerance {c.tolerance:.0e})  {verdict} {c.note}"
                out.append(line.rstrip())
        return out


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def _on(device, fn):
    """`fn` (a module) moved to `device`, called with its tensor arguments moved there, its result brought back to
    the CPU in fp32: the checks' own arithmetic (sampler, noise) stays on the CPU as in the official code."""
    if device is None:
        return fn
    fn = fn.to(device)

    def call(*args):
        out = fn(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
        return out.float().cpu() if isinstance(out, torch.Tensor) else out

    return call


def fixture_kind(tensors: dict[str, torch.Tensor]) -> str:
    if "expected.latent" in tensors and any(k.startswith("encoder.") for k in tensors):
        return "flux_vae"
    has_net = any(k.startswith("net.") for k in tensors)
    if has_net and {"input.lq_latent", "input.noise", "input.y_null"} <= set(tensors):
        return "pid_teacher"  # the undistilled checkpoints: guided DPM-Solver++ from given noise
    if has_net and "input.lq_latent" in tensors:
        return "pid"
    if has_net and "input.noise" in tensors and not any(k.startswith("net.lq_proj.") for k in tensors):
        return "pixeldit_t2i"
    return "unknown"


def _check_pid(t: dict, meta: dict, rep: FixtureReport, device=None) -> None:
    from pipeline.model.config import PidConfig
    from pipeline.model.loading import load_network, network_tensors
    from pipeline.model.sampler import DISTILLED_T, GeneratorNoise, sample

    cfg = PidConfig.from_official(json.loads(meta["config"]))
    module = load_network(cfg, network_tensors(t))
    net = _on(device, module)  # moves `module` there too
    x, y = t["input.x"], t["input.y"]
    sigma, latent = t["input.degrade_sigma"], t["input.lq_latent"]
    with torch.inference_mode():
        lq = module.encode_lq(tuple(x.shape[-2:]), latent=latent.to(device or "cpu"))
        rep.checks.append(
            Check("expected.forward", _max_err(net(x, t["input.t"], y, lq, sigma), t["expected.forward"]))
        )
        sample_keys = [k for k in t if re.fullmatch(r"expected\.sample_seed\d+", k)]
        if not sample_keys:
            return
        seed = int(meta.get("sampler_seed", sample_keys[0].rsplit("seed", 1)[1]))
        key = f"expected.sample_seed{seed}"
        t_list = tuple(json.loads(meta["t_list"])) if "t_list" in meta else DISTILLED_T
        if float(meta.get("timescale", 1000.0)) != 1000.0:
            rep.checks.append(Check(key, None, f"timescale {meta['timescale']} is not supported"))
            return
        # `num_steps` shortens the full t_list by the official rule (our t_schedule; 1 step starts at t = 1.0)
        steps = int(meta.get("num_steps", len(t_list) - 1))
        noise = GeneratorNoise(x.shape, torch.Generator().manual_seed(seed))
        out = sample(lambda xt, tt: net(xt, tt, y, lq, sigma), noise, steps=steps, t_list=t_list)
        rep.checks.append(Check(key, _max_err(out, t[key]) if key in t else None, "" if key in t else "missing"))


def _check_vae(t: dict, meta: dict, rep: FixtureReport, device=None) -> None:
    from pipeline.encoders.flux_vae import FluxEncoderParams, load_flux_encoder

    cfg = json.loads(meta["config"])
    params = FluxEncoderParams.from_dict(cfg)
    tensors = {k: v for k, v in t.items() if k.startswith(("encoder.", "decoder."))}
    enc = load_flux_encoder(params, tensors, device=device or "cpu")
    with torch.inference_mode():
        latent = enc.encode(t["input.image"].to(device or "cpu")).float().cpu()
        rep.checks.append(Check("expected.latent", _max_err(latent, t["expected.latent"])))


# The sampler settings both DPM-Solver++ fixture kinds (PixelDiT, the PiD teacher) must state.
_SOLVER = {"solver": "dpm-solver++", "method": "multistep", "skip_type": "time_uniform_flow", "model_type": "flow"}


def _check_t2i(t: dict, meta: dict, rep: FixtureReport, device=None) -> None:
    from pipeline.model.config import PidConfig
    from pipeline.model.loading import load_network, network_tensors
    from pipeline.t2i import generate

    cfg = PidConfig.from_official(json.loads(meta["config"]), defaults="pixeldit_t2i")
    module = load_network(cfg, network_tensors(t))
    net = _on(device, module)
    with torch.inference_mode():
        out = net(t["input.x"], t["input.t"], t["input.y"])
    rep.checks.append(Check("expected.forward", _max_err(out, t["expected.forward"])))
    if "expected.sample" not in t:
        return
    s = json.loads(meta.get("sampler", "{}"))
    odd = {k: s.get(k) for k, v in _SOLVER.items() if s.get(k) != v}
    if odd or int(s.get("order", 0)) not in (1, 2) or float(meta.get("timescale", 1000.0)) != 1000.0:
        rep.checks.append(Check("expected.sample", None, f"sampler settings not supported: {odd or s}"))
        return
    # the same call `pidray generate`, the job and /v1/generate make (pipeline/t2i.py)
    dev = device or "cpu"  # on the device, as the CLI runs it
    sample = generate(module.to(dev), t["input.y"].to(dev), t["input.y_null"].to(dev), t["input.noise"].to(dev),
                      steps=int(s["steps"]), shift=float(s.get("flow_shift", 1.0)),
                      cfg_scale=float(s.get("cfg_scale", 1.0)), order=int(s["order"])).float().cpu()  # fmt: skip
    rep.checks.append(Check("expected.sample", _max_err(sample, t["expected.sample"])))


def _shift_of(s: dict, hw: tuple[int, int]) -> float:
    """The flow shift a teacher fixture's sampler ran at: its dynamic rule applied to the sample's size (checked
    against the `flow_shift` it records), or the given `flow_shift`."""
    from pipeline.model.guided import dynamic_shift

    rule = str(s.get("shift_rule", "dynamic" if "dynamic_shift" in s else "given"))
    if not rule.startswith("dynamic"):
        return float(s["flow_shift"])
    d = s.get("dynamic_shift") or {}
    shift = dynamic_shift(*hw, float(d.get("base_shift", 6.0)), int(d.get("base_image_size_for_shift_calc", 2048)))
    if "flow_shift" in s and abs(float(s["flow_shift"]) - shift) > 1e-6 * max(1.0, shift):
        raise ValueError(f"flow_shift {s['flow_shift']} disagrees with its dynamic rule, which gives {shift}")
    return shift


def _check_teacher(t: dict, meta: dict, rep: FixtureReport, device=None) -> None:
    """The undistilled PiD checkpoints: the forward, then the guided sampler from the fixture's noise, through
    `guided_sample` as the diffuse stage calls it."""
    from pipeline.model.config import PidConfig
    from pipeline.model.guided import Guidance, guided_sample
    from pipeline.model.loading import load_network, network_tensors

    cfg = PidConfig.from_official(json.loads(meta["config"]))
    module = load_network(cfg, network_tensors(t))
    net = _on(device, module)
    dev = device or "cpu"
    y, sigma, latent = t["input.y"], t["input.degrade_sigma"], t["input.lq_latent"].to(dev)
    with torch.inference_mode():
        if "input.x" in t:
            lq = module.encode_lq(tuple(t["input.x"].shape[-2:]), latent=latent)
            out = net(t["input.x"], t["input.t"], y, lq, sigma)
            rep.checks.append(Check("expected.forward", _max_err(out, t["expected.forward"])))
        if "expected.sample" not in t:
            return
        s = json.loads(meta.get("sampler", "{}"))
        odd = {k: s.get(k) for k, v in _SOLVER.items() if s.get(k) != v}
        steps = int(s.get("steps", 0))
        if odd or steps < 1 or int(s.get("order", 0)) != min(steps, 2) or float(meta.get("timescale", 1000.0)) != 1e3:
            rep.checks.append(Check("expected.sample", None, f"sampler settings not supported: {odd or s}"))
            return
        noise = t["input.noise"]
        g = Guidance(steps, float(s.get("cfg_scale", 1.0)), _shift_of(s, tuple(noise.shape[-2:])))
        lq = module.encode_lq(tuple(noise.shape[-2:]), latent=latent)
        y_null = t["input.y_null"].expand(noise.shape[0], -1, -1)
        sample = guided_sample(lambda x, tt: net(x, tt, y, lq, sigma), lambda x, tt: net(x, tt, y_null, lq, sigma),
                               noise, g)  # fmt: skip
        rep.checks.append(Check("expected.sample", _max_err(sample.float().cpu(), t["expected.sample"]),
                                f"({steps} steps, cfg {g.cfg_scale:g}, shift {g.shift:.4f})"))  # fmt: skip


CHECKERS = {"pid": _check_pid, "pid_teacher": _check_teacher, "flux_vae": _check_vae, "pixeldit_t2i": _check_t2i}


def verify(path: str | Path, device: str | torch.device | None = None) -> FixtureReport:
    """Check one fixture; `device` runs the networks there (the CUDA parity check of `pidray doctor`)."""
    from pipeline.model.loading import read_state_dict

    try:
        tensors, meta = read_state_dict(path)
    except ValueError as e:
        return FixtureReport(str(path), "unreadable", problem=str(e))
    kind = fixture_kind(tensors)
    rep = FixtureReport(str(path), kind)
    if kind not in CHECKERS:
        rep.problem = "unknown fixture kind: no verifier for these tensors yet"
        return rep
    if "config" not in meta:
        rep.problem = "fixture has no `config` metadata"
        return rep
    try:
        bounds = tolerances(meta)
        CHECKERS[kind](tensors, meta, rep, device=device)
    except (ValueError, KeyError) as e:
        rep.problem = f"{type(e).__name__}: {e}"
        return rep
    for c in rep.checks:
        c.tolerance = bounds.get(c.name, bounds.get("default", TOLERANCE))
    done = {c.name for c in rep.checks}
    for name in sorted(k for k in tensors if k.startswith("expected.") and k not in done):
        rep.checks.append(Check(name, None, f"not checked: {name} (no verifier for it): the file fails"))
    return rep
