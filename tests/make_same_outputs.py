"""Makes the references of `tests/test_same_outputs.py`: each case's output pixels, written by the code of a checkout.

    python tests/make_same_outputs.py CHECKOUT [OUT]

CHECKOUT is any pidray checkout (e.g. `git worktree add /tmp/before <rev>`); its `pipeline` and `jobs` packages are
imported ahead of any installed copy, so the references are that code's outputs. OUT defaults to
`tests/data/same_outputs` beside this script. Each output is written as an RGB PNG (`<case>/<name>.png`) and listed
in `references.json` with the sha256 of its pixels, its shape and the commit it was made from.

The cases run the bulk job itself (`jobs.pipeline.run_job`, the in-process loop) on the CPU in float32, with every
setting that shapes an output given explicitly, so that a default changed on purpose does not change a reference:
- `upscale-*`: the sample images bundled with pidray (`pipeline/assets/samples`) through the bundled `small` model.
- `decode-*`: one latent (seeded Gaussian, Flux layout) through stand-ins of a distilled and of an undistilled
  (guided) released preset; `generate-upscale`: one prompt through a stand-in of PixelDiT, its image upscaled by
  `small`. A stand-in is the released preset with its network shrunk to a few blocks, random weights drawn here
  from a seeded NumPy generator at unit gain, and no text encoder (a zero caption, so guidance's two predictions
  are equal). The released networks do not run on a CPU in seconds; the stand-ins run the code paths they do
  (latent reading, tiling, latent noise, the sampler and its noise draws, fusion).

Nothing of pidray is imported at module level, so that `main` can put the checkout first on `sys.path`; the test
imports `CASES` and `run_case` from here and runs them against the code this file is part of.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REFERENCES = HERE / "data" / "same_outputs"
SAMPLES = ("astronaut.png", "chelsea.png", "coffee.jpg")

# Every option that shapes an output, pinned. The tile above all: 6b0027b made 256 the small preset's default on a
# CPU (128, its trained tile, before); pinned, the references are about the code, not its defaults. PNG: outputs
# are compared as pixels, never through a lossy encoding.
_PINNED = {"scale": None, "degrade_sigma": 0.0, "sampler": "sde", "fusion": True, "tile_buckets": False,
           "format": "png", "caption": ""}  # fmt: skip
CASES: dict[str, dict] = {
    # the preset's own sampling (one step, shifted-grid ensemble) at its trained tile: 3x3 and 4x4 tiles
    "upscale-default": {"workflow": "upscale", "preset": "small",
                        "options": {**_PINNED, "seed": 7, "steps": 1, "ensemble": True, "tile": 128, "overlap": 8}},
    # three SDE steps (a draw of keyed tile noise before each re-noising), no ensemble, 3x3 tiles fused every step
    "upscale-steps": {"workflow": "upscale", "preset": "small", "inputs": ("chelsea.png",),
                      "options": {**_PINNED, "seed": 11, "steps": 3, "ensemble": False, "tile": 128, "overlap": 8}},
    # the distilled few-step sampler on 2x2 tiles, with the latent's degrade noise
    "decode-distilled": {"workflow": "decode", "preset": "flux-2k", "latent_format": "flux",
                         "options": {**_PINNED, "seed": 3, "steps": 4, "degrade_sigma": 0.2, "ensemble": False,
                                     "tile": 128, "overlap": 1}},
    # guided DPM-Solver++ (two forwards a step: the caption and the null caption) on the same latent
    "decode-guided": {"workflow": "decode", "preset": "flux-2kto4k-v1.5-undistilled", "latent_format": "flux",
                      "options": {**_PINNED, "seed": 5, "steps": 3, "cfg_scale": 3.0, "shift": 2.0,
                                  "ensemble": False, "tile": 128, "overlap": 1}},
    # PixelDiT's own sampler (its settings on the prompt's line), then `small` on the 64x64 image: 3x3 tiles
    "generate-upscale": {"workflow": "generate", "preset": "pixeldit-2k", "upscale": "small",
                         "prompt": {"prompt": "a cat", "seed": 4, "size": [64, 64], "steps": 3, "cfg_scale": 2.0,
                                    "shift": 3.0, "negative_prompt": ""},
                         "options": {**_PINNED, "seed": 9, "steps": 1, "ensemble": True, "tile": 128, "overlap": 8}},
}  # fmt: skip

LATENT_HW = (6, 6)  # latent pixels: 192x192 output pixels at 8x (VAE) x 4x (PiD), 2x2 tiles of 128
STAND_IN_SIZES = {"hidden_size": 64, "num_groups": 4, "pixel_hidden_size": 8, "pixel_attn_hidden_size": 32,
                  "pixel_num_groups": 4, "patch_depth": 2, "pixel_depth": 1, "txt_embed_dim": 16,
                  "txt_max_length": 8, "rope_ref_h": 128, "rope_ref_w": 128}  # fmt: skip
STAND_IN_LQ = {"lq_hidden_dim": 32, "lq_num_res_blocks": 2, "lq_interval": 1}  # PiD's LQ branch, not PixelDiT's


def _settings() -> None:
    """The tiles per network call, as in every run of the references: it may change how float32 sums round."""
    os.environ.setdefault("PIDRAY_CPU_TILES_PER_CALL", "4")


@contextmanager
def one_thread():
    """torch on one thread while the cases run, for the references and the test alike: sums split the same way
    on any machine, and no OpenMP team spins against other work on a busy one (the cases take a few CPU seconds)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stand_in(name: str, root: Path):
    """A stand-in of preset `name` under root (see the module docstring): (its Preset, its weights file)."""
    import dataclasses

    import torch

    from pipeline.model.loading import save_safetensors
    from pipeline.model.network import PidNet
    from pipeline.model.presets import get_preset

    real = get_preset(name)
    t2i = real.task == "t2i"
    cfg = dataclasses.replace(real.config, **STAND_IN_SIZES, **({} if t2i else STAND_IN_LQ))
    preset = dataclasses.replace(real, name=f"same-outputs-{real.name}", config=cfg, text_encoder="none",
                                 envelope=(32, 128) if t2i else (128, 128), tile_overlap=1)  # fmt: skip
    net = PidNet(cfg)
    rng = np.random.default_rng(20260101)
    with torch.no_grad():
        for key, p in sorted(net.named_parameters()):
            n = rng.standard_normal(tuple(p.shape))
            if p.ndim >= 2:  # a matrix or kernel at unit gain: the output depends on the latent, the noise and x
                n = n / np.sqrt(np.prod(p.shape[1:]))
            else:  # a norm's scale near 1, a bias or a gate near 0
                n = (1.0 if key.endswith("weight") else 0.0) + 0.1 * n
            p.copy_(torch.from_numpy(np.asarray(n, dtype=np.float32)))
    path = root / f"{preset.name}.safetensors"
    save_safetensors(net, path, cfg)
    return preset, path


def _latent_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(99).standard_normal((16, *LATENT_HW)).astype(np.float32))
    return buf.getvalue()


def run_case(name: str, work: Path) -> dict[str, np.ndarray]:
    """The case's outputs from the code imported now: output name -> [H, W, 3] uint8. work: an empty folder."""
    from PIL import Image

    import pipeline
    from jobs.config import JobConfig
    from jobs.pipeline import run_job
    from pipeline.model.presets import PRESETS
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions

    case = CASES[name]
    cpu = {"device": "cpu", "dtype": "fp32"}
    src, dst = work / "src", work / "dst"
    src.mkdir(parents=True)
    added, extra = [], {}
    if case["workflow"] == "upscale":
        samples = Path(pipeline.__file__).parent / "assets" / "samples"
        for f in case.get("inputs", SAMPLES):
            (src / f).write_bytes((samples / f).read_bytes())
        model = ModelOptions(preset=case["preset"], **cpu)
    else:
        preset, weights = stand_in(case["preset"], work)
        PRESETS[preset.name] = preset
        added.append(preset.name)
        model = ModelOptions(preset=preset.name, weights=str(weights), **cpu)
        if case["workflow"] == "decode":
            (src / "latent.npy").write_bytes(_latent_npy())
            extra["latent_format"] = case["latent_format"]
        else:
            src = src / "prompts.jsonl"
            src.write_text(json.dumps(case["prompt"]) + "\n")
            extra["upscale"] = ModelOptions(preset=case["upscale"], **cpu)
    try:
        cfg = JobConfig(src=str(src), dst=str(dst), model=model, options=UpscaleOptions(**case["options"]),
                        workflow=case["workflow"], local=True, progress=False, **extra)  # fmt: skip
        summary = run_job(cfg)
    finally:
        for key in added:
            PRESETS.pop(key, None)
    if summary.failed or not summary.ok:
        raise RuntimeError(f"{name}: {summary.failed} failed of {summary.ok + summary.failed}: {summary.failures}")
    return {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in sorted(dst.glob("*.png"))}


def sha256(pixels: np.ndarray) -> str:
    """Of the pixels themselves (shape and uint8 values), not of a PNG encoding of them."""
    return hashlib.sha256(repr(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    checkout = Path(argv[0]).resolve()
    out = Path(argv[1]).resolve() if len(argv) > 1 else REFERENCES
    sys.path.insert(0, str(checkout))
    _settings()
    import pipeline

    if not Path(pipeline.__file__).resolve().is_relative_to(checkout):
        print(f"pipeline was imported from {pipeline.__file__}, not from {checkout}", file=sys.stderr)
        return 2
    from PIL import Image

    listing = {"commit": _commit(checkout), "cases": {}}
    for name in CASES:
        with tempfile.TemporaryDirectory() as tmp, one_thread():
            outputs = run_case(name, Path(tmp))
        (out / name).mkdir(parents=True, exist_ok=True)
        listing["cases"][name] = {}
        for key, pixels in outputs.items():
            Image.fromarray(pixels).save(out / name / f"{key}.png", optimize=True)
            listing["cases"][name][key] = {"shape": list(pixels.shape), "sha256": sha256(pixels)}
        print(f"{name}: {', '.join(f'{k} {v.shape[1]}x{v.shape[0]}' for k, v in outputs.items())}")
    text = json.dumps(listing, indent=1)
    text = re.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text)  # each shape on one line
    (out / "references.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
