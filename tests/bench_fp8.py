"""FP8 (`--precision fp8`) quality gate, one run on the CPU (torch._scaled_mm with row-wise scales runs here):

1. the bundled model's output with FP8 matmuls vs without, on the sample images (PSNR, dB) — with the default kept
   layers and with every eligible layer in FP8, to show what keeping them buys;
2. the full-depth flux-2k network with random weights at 256²: FP8's relative error vs fp32, beside bf16's.

    PYTHONPATH=. python tests/bench_fp8.py
"""

import io
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "samples"


def upscale_all(precision: str, keep=None) -> list[np.ndarray]:
    from pipeline.graph import StageGraph
    from pipeline.kernels import fp8
    from pipeline.runtime import ModelOptions

    saved = fp8.KEEP
    if keep is not None:
        fp8.KEEP = keep
    try:
        graph = StageGraph(ModelOptions(preset="small", device="cpu", dtype="fp32", precision=precision))
        stages = graph.build_all()
        rows = [{"key": p.name, "bytes": p.read_bytes()} for p in sorted(SAMPLES.glob("*.*")) if p.suffix != ".md"]
        outs = list(graph.run_local(rows, stages))
    finally:
        fp8.KEEP = saved
    assert all(r["status"] == "ok" for r in outs), [r.get("error") for r in outs]
    return [np.asarray(Image.open(io.BytesIO(r["output"])).convert("RGB"), dtype=np.float64) for r in outs]


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def bundled_gate() -> dict:
    from pipeline.kernels.fp8 import KEEP

    ref = upscale_all("auto")
    res = {}
    everything = ("mlp.fc1", "mlp.fc2", "final_layer", "t_embedder")  # the layers that must stay (read directly)
    for label, keep in (("default kept layers", KEEP), ("every layer it can take", everything)):
        got = upscale_all("fp8", keep)
        res[label] = [round(psnr(a, b), 2) for a, b in zip(got, ref)]
        print(f"bundled model, FP8 vs fp32 ({label}): PSNR {res[label]} dB on {len(ref)} sample images")
    return res


def random_full_depth(size: int = 256) -> dict:
    from pipeline.doctor.common import build_net
    from pipeline.doctor.precision_steps import _precision_case
    from pipeline.model.presets import get_preset

    cfg = get_preset("flux-2k").config
    net = build_net(cfg, "cpu", torch.float32, "torch")
    g = torch.Generator().manual_seed(2)
    f = cfg.latent_factor
    inputs = {"latent": torch.randn(1, cfg.lq_latent_channels, size // f, size // f, generator=g),
              "x": torch.randn(1, 3, size, size, generator=g),
              "y": torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim, generator=g),
              "t": torch.tensor([866.0]), "sigma": torch.tensor([0.2])}  # fmt: skip
    t0 = time.time()
    res = _precision_case(net, inputs, torch.device("cpu"), 0)
    print(f"flux-2k full depth, random weights, {size}²: relative error vs fp32 — bf16 weights "
          f"{res['bf16_weights_rel_err']:.2%}, autocast {res['autocast_rel_err']:.2%}, FP8 {res['fp8_rel_err']:.2%} "
          f"({time.time() - t0:.0f} s)")  # fmt: skip
    return res


if __name__ == "__main__":
    bundled_gate()
    random_full_depth()
