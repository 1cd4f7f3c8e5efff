"""The precision step (fp32 vs bf16 weights vs autocast vs FP8) and the deployment's weights check."""

from __future__ import annotations

import json
import os

import torch

from pipeline.doctor.common import build_net, median_ms, rel_err
from pipeline.doctor.harness import Check, innermost


def _precision_case(net32, inputs: dict, device, reps: int) -> dict:
    """One network's forward (LQ encoding included) in fp32, with bf16 weights (how pidray runs on a GPU), and with
    fp32 weights under bf16 autocast (how the official code runs), and with e4m3 matmuls on the bf16 weights
    (`--precision fp8`): errors relative to fp32, and ms. Each variant is guarded on its own: one that raises is
    reported as `error: ...` with its traceback, and the others' figures stay."""
    import copy

    from pipeline.kernels.fp8 import quantize_fp8

    def fwd(net, dt):
        i = {k: v.to(dt) if v.is_floating_point() and k != "t" else v for k, v in inputs.items()}
        lq = net.encode_lq(tuple(i["x"].shape[-2:]), latent=i["latent"])
        return net(i["x"], i["t"], i["y"], lq, i["sigma"])

    def autocast_fwd():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fwd(net32, torch.float32)

    def fp8_net(net16):
        net8 = copy.deepcopy(net16)
        quantize_fp8(net8)
        return net8

    res: dict = {}
    with torch.inference_mode():
        ref = fwd(net32, torch.float32)
        net16 = copy.deepcopy(net32).to(torch.bfloat16)
        variants = {"bf16_weights": lambda: fwd(net16, torch.bfloat16), "autocast": autocast_fwd}
        try:
            net8 = fp8_net(net16)
            variants["fp8"] = lambda: fwd(net8, torch.bfloat16)
        except Exception as e:  # fp8 that cannot be made here is a finding: the other variants still run
            res["fp8_rel_err"] = f"error: {type(e).__name__}: {str(e)[:300]}"
            res["fp8 traceback"] = innermost(e)
        for name, fn in variants.items():
            try:
                res[f"{name}_rel_err"] = rel_err(fn(), ref)
                if reps:
                    res[f"{name}_ms"] = median_ms(fn, reps, 0)
            except Exception as e:  # one variant's failure is a finding: the others still run
                res[f"{name}_rel_err"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                res[f"{name} traceback"] = innermost(e)
        if reps:
            res["fp32_ms"] = median_ms(lambda: fwd(net32, torch.float32), reps, 0)
    return res


def _record(c: Check, label: str, res: dict) -> None:
    """A case whose variants raised counts as a failed item of the step (its other figures are reported)."""
    failed = [k[: -len("_rel_err")] for k, v in res.items() if k.endswith("_rel_err") and isinstance(v, str)]
    if failed:
        c.errors.setdefault(c.step, []).append(f"{label} ({', '.join(failed)})")


def step_precision(c: Check, put) -> None:
    """bf16 weights without autocast vs fp32 weights under bf16 autocast, against fp32 — on the
    golden PiD fixtures (official fp32 outputs) and on the full-depth network with random weights; FP8 beside them.
    Each fixture and the random-weight network are items of their own."""
    from pipeline.golden import fixture_kind
    from pipeline.model.config import PidConfig
    from pipeline.model.loading import load_network, network_tensors, read_state_dict

    def fixture(f):
        t, meta = read_state_dict(f)
        if fixture_kind(t) not in ("pid", "pid_teacher"):
            return
        net = load_network(PidConfig.from_official(json.loads(meta["config"])), network_tensors(t)).to(c.device)
        names = {"x": "input.x", "t": "input.t", "y": "input.y", "latent": "input.lq_latent",
                 "sigma": "input.degrade_sigma"}  # fmt: skip
        res = _precision_case(net, {k: t[v].to(c.device) for k, v in names.items()}, c.device, 0)
        put(f.name, res)
        _record(c, f.name, res)

    for f in c.golden_files(missing_ok=True):  # the golden step says when asked-for fixtures are missing
        if f.name.startswith("pid"):
            c.item(put, f.name, lambda f=f: fixture(f))
    size = c.sizes[0]
    cfg, dev = c.cfg, c.device

    def random_weights():
        net = build_net(cfg, dev, torch.float32, "torch")
        g = torch.Generator(device=dev).manual_seed(2)
        f = cfg.latent_factor
        inputs = {"latent": torch.randn(1, cfg.lq_latent_channels or cfg.lq_in_channels, size // f, size // f,
                                        device=dev, generator=g),
                  "x": torch.randn(1, 3, size, size, device=dev, generator=g),
                  "y": torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, device=dev, generator=g),
                  "t": torch.tensor([866.0], device=dev), "sigma": torch.tensor([0.2], device=dev)}  # fmt: skip
        res = _precision_case(net, inputs, dev, 1 if dev.type == "cpu" else c.reps)
        put(f"random weights {size}², depth {cfg.patch_depth}+{cfg.pixel_depth}", res)
        _record(c, f"random weights {size}²", res)

    c.item(put, f"random weights {size}²", random_weights)


def step_weights(c: Check, put) -> None:
    """The weights a deployment will load are where it looks ($PIDRAY_PRESET, default small; $PIDRAY_WEIGHTS): the
    image's health check, so a pod without its weights volume says so instead of failing at the first request."""
    from pipeline.model.presets import get_preset
    from pipeline.weights import resolve

    def weights():
        preset = get_preset(os.environ.get("PIDRAY_PRESET", "small"))
        put("preset", preset.name)
        paths = resolve(preset, allow_download=False)  # raises, listing every missing file with its command
        put("found", {k: str(v) for k, v in paths.items()})

    c.item(put, "weights", weights)
