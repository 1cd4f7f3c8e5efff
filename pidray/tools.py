"""The small commands about models and checkpoints: `pidray presets`, `download`, `doctor`, `golden`, `info`,
`convert` — each its options (`add_*_parser`, named in `pidray.cli.COMMANDS` / `MAINTENANCE`) and what it runs.

Imported only when one of them is parsed; what they run (torch, the model) is imported when it runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _cmd_golden(args) -> int:
    from pipeline.golden import verify

    worst = 0
    files = []
    for path in args.files:  # a folder: every fixture in it
        files += sorted(str(f) for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() else [path]
    for path in files:
        rep = verify(path)
        print("\n".join(rep.lines()))
        worst = max(worst, 0 if rep.ok else 1)
    return worst


# `pidray presets`: how to choose, said before the table (its first line comes before the model list is loaded).
PRESETS_GUIDE = """\
Which model (-m/--model):
  photos, renders     small (bundled): a light model that runs on a CPU; with NVIDIA's released
                      weights, flux-2kto4k-v1.5 for 2K-4K outputs, a -2k preset for about 2K
  generator latents   the preset whose latents column names the generator (pidray decode)
  text to image       pixeldit-2k (pidray generate)
  reference quality   an -undistilled preset: 25 steps of 2 passes each, ~12x slower than its twin
"""
# The resolution each released variant was trained for (the size of its output tiles).
TRAINED = {"2k": "2K", "2kto4k": "2K-4K", "2kto4k_v1pt5": "2K-4K", "t2i": "2K"}


def _cmd_presets(args) -> int:
    print(PRESETS_GUIDE, flush=True)
    from pipeline.model.presets import ALIASES, PRESETS
    from pipeline.weights import WeightsNotFound, resolve

    def latents(p) -> str:  # the --latent-format names of the generators whose latents it decodes
        if not p.decodes_latents:
            return "-"
        names = sorted(set(p.family.formats) - {p.vae}) or [p.vae]  # the generators' (packed forms: same latents)
        return ", ".join(names)

    w = max(map(len, PRESETS))
    print(f"{'preset':{w}s}  scale  size   steps  {'latents':12s}  here")
    order = sorted(PRESETS.values(), key=lambda p: (not p.bundled, not p.upscales))  # the bundled one first
    for p in order:
        name = p.name
        scale = f"x{p.scale}" if p.upscales else "-"
        size = TRAINED.get(p.variant, "any")  # the bundled model: any size, in 128-pixel tiles
        if p.generates_images:
            steps = f"{p.t2i.get('steps')}x2"
        else:
            steps = f"{p.default_steps}x2" if p.sampling.guided else str(p.default_steps)
        try:  # usable here: every file the network and its encoder need is found (never downloaded)
            resolve(p, args.weights, allow_download=False)
            here = "ready"
        except WeightsNotFound:
            here = "weights missing"
        if p.upscales and not p.family.implemented:
            here += ", latents only"  # its image encoder is not implemented: pidray decode only
        if p.captioned:
            here += "+captioner"  # it also needs the Gemma caption encoder (--text-encoder DIR)
        print(f"{name:{w}s}  {scale:5s}  {size:5s}  {steps:5s}  {latents(p):12s}  {here}")
    print("size: the output size it was trained for (larger ones are made in tiles); steps: network passes")
    print("aliases:", ", ".join(f"{a}={b}" for a, b in ALIASES.items()))
    where = args.weights or os.environ.get("PIDRAY_WEIGHTS")
    where = f"under {where}" if where else "(no --weights DIR or PIDRAY_WEIGHTS)"
    print(f"here: ready = every weight file found {where};")
    print("      +captioner = also needs the Gemma-2-2B-it caption encoder (--text-encoder DIR);")
    print("      pidray download NAME fetches a preset's weights")
    return 0


def _cmd_info(args) -> int:
    import torch

    from pipeline.model.loading import to_official
    from pipeline.model.network import PidNet
    from pipeline.model.presets import get_preset

    preset = get_preset(args.preset)
    with torch.device("meta"):
        net = PidNet(preset.config)
    n = sum(p.numel() for p in net.parameters())
    print(f"preset {preset.name}: {n:,} parameters ({n / 1e9:.3f} B), checkpoint {preset.checkpoint}")
    if args.keys:
        for k, v in net.state_dict().items():
            print(f"  {to_official(k)} {list(v.shape)}")
    return 0


def _cmd_convert(args) -> int:
    import torch

    from pipeline.model.loading import convert
    from pipeline.model.presets import get_preset

    preset = get_preset(args.preset)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    n = convert(args.src, args.dst, preset.config, dtype=dtype)
    print(f"wrote {args.dst}: {n} tensors, preset {preset.name}")
    return 0


def _cmd_download(args) -> int:
    from pipeline.model.presets import HUB_REPO, get_preset
    from pipeline.weights import LICENCE_NOTE, resolve

    preset = get_preset(args.preset)
    print(LICENCE_NOTE, file=sys.stderr)
    for f in preset.weight_files():
        if f.repo != HUB_REPO:
            print(f"{f.local}: from {f.repo}, {f.licence}", file=sys.stderr)
    paths = resolve(preset, args.weights, allow_download=True)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0


def _cmd_doctor(args) -> int:
    from pipeline import doctor

    if not (args.gpu or args.smoke or args.steps):
        args.steps = "versions"
    return doctor.cmd(args)


def add_presets_parser(sub, parents) -> None:
    p = sub.add_parser("presets", parents=parents)
    p.add_argument("--weights", default=None, help="the weights folder to look in (default: $PIDRAY_WEIGHTS)")
    p.set_defaults(fn=_cmd_presets)


def add_download_parser(sub, parents) -> None:
    p = sub.add_parser("download", parents=parents)
    p.add_argument("preset", help="a preset name (pidray presets)")
    p.add_argument("--weights", default=None, help="folder to put them in, laid out like the hub repository "
                   "(default: $PIDRAY_WEIGHTS, else Hugging Face's cache)")  # fmt: skip
    p.set_defaults(fn=_cmd_download)


def add_doctor_parser(sub, parents) -> None:
    from pipeline import doctor

    p = sub.add_parser("doctor", parents=parents)
    p.add_argument("--gpu", action="store_true", help="run every check (default: versions and attention backends)")
    doctor.add_args(p)
    p.set_defaults(fn=_cmd_doctor)


def add_golden_parser(sub, parents) -> None:
    p = sub.add_parser("golden", parents=parents)
    p.add_argument("files", nargs="+", help="fixture files, or folders of them")
    p.set_defaults(fn=_cmd_golden)


def add_info_parser(sub, parents) -> None:
    p = sub.add_parser("info", parents=parents)
    p.add_argument("preset", help="a preset name (pidray presets) or a preset file (.json)")
    p.add_argument("--keys", action="store_true", help="also list every tensor: its official name and shape")
    p.set_defaults(fn=_cmd_info)


def add_convert_parser(sub, parents) -> None:
    p = sub.add_parser("convert", parents=parents)
    p.add_argument("src", help="the official checkpoint (model_ema_bf16.pth)")
    p.add_argument("dst", help="the safetensors file to write")
    p.add_argument("--preset", required=True, help="the preset the checkpoint belongs to (pidray presets)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: keep the source's")
    p.set_defaults(fn=_cmd_convert)
