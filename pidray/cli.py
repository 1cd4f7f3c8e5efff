"""`pidray` command line: upscaling jobs, the endpoint, checkpoint tools and benchmarks."""

from __future__ import annotations

import argparse
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


def _cmd_presets(args) -> int:
    from pipeline.model.presets import ALIASES, PRESETS
    from pipeline.runtime import LQ_ENCODERS

    w = max(map(len, PRESETS))
    print(f"{'preset':{w}s} {'variant':13s} scale  {'encoder':10s} latent_ch  {'does':14s} {'sampler':17s} checkpoint")
    for name, p in PRESETS.items():
        if p.task == "t2i":
            does = "text->image"
        else:  # upscales images when its encoder is implemented; decodes latents when it takes a VAE latent
            does = (
                "+".join(w for w, ok in (("images", p.vae in LQ_ENCODERS), ("latents", p.decodes_latents)) if ok)
                or "no"
            )
        scale = f"x{p.scale}" if p.task == "upscale" else "-"
        if p.task == "t2i":
            sampler = f"guided, {p.t2i.get('steps')} steps"
        elif p.sampler == "guided":
            sampler = f"guided, {p.default_steps}x2 fwd"
        else:
            sampler = f"{p.default_steps} steps"
        print(f"{name:{w}s} {p.variant:13s} {scale:6s} {p.vae:10s} {p.latent_channels:<9d}  {does:14s} {sampler:17s} "
              f"{p.checkpoint}")  # fmt: skip
    print("aliases:", ", ".join(f"{a}->{b}" for a, b in ALIASES.items()))
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


def _cmd_eval_small(args) -> int:
    from jobs.eval_small import main as eval_main

    return eval_main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pidray", description=__doc__)
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    common = argparse.ArgumentParser(add_help=False)  # --debug is accepted after the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("golden", help="verify golden fixtures against our implementation (exit 1 on any failure)")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=_cmd_golden)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(fn=_cmd_presets)

    p = sub.add_parser("info", help="build a preset's network on the meta device; parameter count, keys")
    p.add_argument("preset")
    p.add_argument("--keys", action="store_true", help="print every state-dict key (official names) and shape")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("convert", help="official model_ema_bf16.pth -> pidray safetensors (strictly validated)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--preset", required=True)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: keep the source's")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("download", help="download a preset's released weights (NVIDIA non-commercial licence)")
    p.add_argument("preset")
    p.add_argument("--weights", default=None, help="directory to place them in (hub layout)")
    p.set_defaults(fn=_cmd_download)

    p = sub.add_parser("eval-small", help="evaluate the bundled small model against bicubic on held-out photos")
    p.add_argument("--weights", default=None, help="a small-model safetensors (default: the bundled one)")
    p.add_argument("--size", type=int, default=256, help="HQ centre-crop size")
    p.add_argument("--runs", type=int, default=5, help="timed runs of the 256->1024 upscale")
    p.add_argument("--report", default="out/eval_small", help="folder for the side-by-side PNGs and JSON")
    p.add_argument(
        "--compare",
        default=None,
        help="another small-model safetensors measured side by side; 'previous': the first bundled model",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: what each model was trained for, from its metadata)",
    )
    p.set_defaults(fn=_cmd_eval_small)

    from pipeline import doctor

    p = sub.add_parser("doctor", help="the device check (--gpu: every step, ~8 min; --smoke: CPU, tiny, seconds)")
    p.add_argument("--gpu", action="store_true", help="run every step (default: versions and SDPA backends only)")
    doctor.add_args(p)
    p.set_defaults(fn=_cmd_doctor)

    from jobs.upscale import add_decode_parser, add_upscale_parser
    from pidray.bench import add_bench_parser
    from serve.run import add_serve_parser

    add_upscale_parser(sub, parents=[common])
    add_decode_parser(sub, parents=[common])
    from jobs.generate import add_generate_parser

    add_generate_parser(sub, parents=[common])
    from jobs.status import add_status_parser

    add_status_parser(sub, parents=[common])
    add_bench_parser(sub)
    add_serve_parser(sub, parents=[common])
    return ap


def _cmd_doctor(args) -> int:
    from pipeline import doctor

    if not (args.gpu or args.smoke or args.steps):
        args.steps = "versions"
    return doctor.cmd(args)


def _one_line(e: BaseException) -> str | None:
    """The message for an expected failure (bad input, setup, storage), or None for a bug."""
    from pipeline.errors import PidrayError

    if isinstance(e, (PidrayError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError)):
        return str(e)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return None
    if isinstance(e, (BotoCoreError, ClientError)):
        from pipeline.storage import explain_storage_error

        return explain_storage_error(e, "use", "S3")
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except BrokenPipeError:  # `pidray info ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"pidray {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        message = _one_line(e)
        if message is None:  # a bug: still no wall of text, but the way to see it
            print(f"pidray {args.cmd}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"pidray {args.cmd}: error: {message}", file=sys.stderr)  # user errors: one clear line, exit 2
        return 2


if __name__ == "__main__":
    sys.exit(main())
