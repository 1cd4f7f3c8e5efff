"""`pidray` command line: upscaling jobs, the endpoint, checkpoint tools and benchmarks.

The one place that sees every subcommand (the jobs' and the endpoint's parsers are added from their own modules):
the shared flags, the did-you-mean hints, the error-to-exit-code handling, and the small checkpoint commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Flags other upscalers use that pidray spells differently: the hint replaces "unrecognized arguments".
_POSITIONAL = "SRC and DST are positional, with no flag: pidray upscale in.png out.png"
_MODEL = "choose the model with -m/--model (pidray presets lists them)"
FOREIGN_FLAGS = {"-i": _POSITIONAL, "--input": _POSITIONAL, "-o": _POSITIONAL, "--output": _POSITIONAL, "-n": _MODEL,
                 "--model-name": _MODEL}  # fmt: skip


def version() -> str:
    from pipeline import __version__

    return __version__


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help line ends with its default, unless the line already speaks of it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS, "", [])
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


class Parser(argparse.ArgumentParser):
    """argparse with errors a newcomer can act on: a subcommand reports its own usage, an unknown flag or choice
    gets the nearest match, and flags from other upscalers get a hint."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kw)

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and "--resume-mode" in self._option_string_actions:  # --resume=MODE: a flag and a mode
            args = [a for arg in args for a in (["--resume", "--resume-mode", arg.split("=", 1)[1]]
                                                if arg.startswith("--resume=") else [arg])]  # fmt: skip
        got, extra = super().parse_known_args(args, namespace)
        if extra and self.prog != "pidray":  # a subcommand: the unknown flags are its own, said with its usage
            self.error(self.unknown(extra))
        return got, extra

    def unknown(self, extra: list[str]) -> str:
        import difflib

        flags = sorted(s for s in self._option_string_actions if s.startswith("--") and s != "--help")
        hints = []
        for arg in extra:
            name = arg.split("=", 1)[0]
            if name in FOREIGN_FLAGS:
                if FOREIGN_FLAGS[name] not in hints:
                    hints.append(FOREIGN_FLAGS[name])
            elif name.startswith("-"):
                near = difflib.get_close_matches(name if name.startswith("--") else f"-{name}", flags, n=1, cutoff=0.7)
                if near:
                    hints.append(f"did you mean {near[0]}?")
        text = f"unrecognized arguments: {' '.join(extra)}"
        return f"{text} ({'; '.join(hints)})" if hints else text

    def error(self, message):
        import difflib
        import re

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            near = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            if near:
                message += f"; did you mean {near[0]!r}?"
        message = message.replace("argument --resume-mode:", "--resume=MODE:")
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def tile_arg(text: str) -> int | None:
    """-t/--tile: a side in output pixels; 0 means automatic (the model's envelope), as in Real-ESRGAN."""
    from jobs.upscale import whole_arg

    pixels = "a whole number of pixels (0: automatic)"
    return whole_arg(text, 0, pixels, "must be 0 (automatic) or a positive number of pixels") or None


def gpu_arg(text: str) -> str:
    """-g N: --device cuda:N."""
    from jobs.upscale import whole_arg

    return f"cuda:{whole_arg(text, 0, 'a GPU number (0, 1, ...)', 'expected a GPU number (0, 1, ...)')}"


# One meaning per flag across the commands: the help line of a shared option a command declares without one.
COMMON_HELP = {
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "compute precision; auto: bf16 on a GPU, fp32 on a CPU",
    "seed": "run seed; each output's seed derives from it",
    "steps": "sampler steps (default: the preset's)",
    "negative_prompt": "what the image should not show (default: the preset's)",
    "quality": "JPEG/WebP quality, 1-100",
    "local": "the in-process loop (default for small jobs with no RAY_ADDRESS)",
    "s3_endpoint": "S3-compatible endpoint URL",
    "s3_region": "S3 region (default: the AWS configuration's)",
    "no_progress": "no progress bar or progress lines",
    "verbose": "let Ray's own messages through",
    "preset": "preset (pidray presets)",
    "weights": "hub-layout weights folder, or a checkpoint file",
    "diffuse_actors": "diffusion actors (Ray Data; default: one per GPU)",
}


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every subcommand (nested ones too): a help line on each option, and the aliases."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _finish(p)
        elif action.help is None:
            action.help = (
                "Ray Data, whatever the size" if "--ray" in action.option_strings else COMMON_HELP.get(action.dest)
            )
    _add_aliases(parser)
    options = [a for a in parser._actions if a.option_strings]
    if len(options) > 8 and parser.usage is None:  # the full list is in --help; an error shows the shape of the call
        args = " ".join(
            a.metavar or a.dest.upper() for a in parser._actions if not a.option_strings and a.help != argparse.SUPPRESS
        )
        parser.usage = f"{parser.prog} [options] {args}".rstrip()


def _add_aliases(parser: argparse.ArgumentParser) -> None:
    """Real-ESRGAN-style short forms on every subcommand that takes the matching long option: -g N for
    --device cuda:N, --fp32 for --dtype fp32, -t 0 for an automatic tile."""
    opts = parser._option_string_actions

    def group_of(flag: str):  # the alias is listed beside the option it stands for
        return next((g for g in parser._action_groups if opts[flag] in g._group_actions), parser)

    if "--device" in opts and not {"-g", "--gpu"} & set(opts):  # doctor's --gpu means something else
        group_of("--device").add_argument("-g", dest="device", type=gpu_arg, default=argparse.SUPPRESS, metavar="N",
                            help="run on GPU N: the same as --device cuda:N")  # fmt: skip
    if "--dtype" in opts and "--fp32" not in opts:
        group_of("--dtype").add_argument(
            "--fp32",
            dest="dtype",
            action="store_const",
            const="fp32",
            default=argparse.SUPPRESS,
            help="float32: the same as --dtype fp32",
        )
    if "--tile" in opts:
        opts["--tile"].type = tile_arg
        opts["--tile"].help = "tile side in output pixels; 0: automatic, from the model's envelope"


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
    from pipeline.weights import WeightsNotFound, resolve

    w = max(map(len, PRESETS))
    print(f"{'preset':{w}s} {'variant':13s} scale  {'encoder':10s} latent_ch  {'does':14s} {'sampler':17s} "
          f"{'here':17s} checkpoint")  # fmt: skip
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
        try:  # usable here: every file the network and its encoder need is found (never downloaded)
            resolve(p, args.weights, allow_download=False)
            here = "ready"
        except WeightsNotFound:
            here = "weights missing"
        if p.text_encoder != "none":
            here += "+captioner"  # it also needs the Gemma caption encoder (--text-encoder DIR)
        print(f"{name:{w}s} {p.variant:13s} {scale:6s} {p.vae:10s} {p.latent_channels:<9d}  {does:14s} {sampler:17s} "
              f"{here:17s} {p.checkpoint}")  # fmt: skip
    print("aliases:", ", ".join(f"{a}->{b}" for a, b in ALIASES.items()))
    where = args.weights or os.environ.get("PIDRAY_WEIGHTS")
    print(f"here: 'ready' = all weights found {'under ' + where if where else '(no --weights DIR or PIDRAY_WEIGHTS)'}"
          "; '+captioner' = also needs the Gemma-2-2B-it caption encoder (--text-encoder DIR); "
          "pidray download PRESET fetches a preset's weights")  # fmt: skip
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
    ap = Parser(prog="pidray", description=__doc__, epilog="pidray COMMAND --help shows a command's options.")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    ap.add_argument("--version", action="version", version=f"pidray {version()}")
    common = argparse.ArgumentParser(add_help=False)  # --debug is accepted after the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("golden", help="verify golden fixtures against our implementation (exit 1 on any failure)")
    p.add_argument("files", nargs="+", help="fixture files, or folders of them")
    p.set_defaults(fn=_cmd_golden)

    p = sub.add_parser("presets", help="list the model presets and which of them are ready to run here")
    p.add_argument("--weights", default=None, help="the weights folder to look in (default: $PIDRAY_WEIGHTS)")
    p.set_defaults(fn=_cmd_presets)

    p = sub.add_parser("info", help="build a preset's network on the meta device; parameter count, keys")
    p.add_argument("preset", help="a preset name (pidray presets) or a preset file (.json)")
    p.add_argument("--keys", action="store_true", help="print every state-dict key (official names) and shape")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("convert", help="official model_ema_bf16.pth -> pidray safetensors (strictly validated)")
    p.add_argument("src", help="the official checkpoint (.pth)")
    p.add_argument("dst", help="the safetensors file to write")
    p.add_argument("--preset", required=True, help="the preset whose architecture the checkpoint has")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: keep the source's")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("download", help="download a preset's released weights (NVIDIA non-commercial licence)")
    p.add_argument("preset", help="a preset name (pidray presets)")
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
    _finish(ap)
    return ap


def _cmd_doctor(args) -> int:
    from pipeline import doctor

    if not (args.gpu or args.smoke or args.steps):
        args.steps = "versions"
    return doctor.cmd(args)


def _failure(e: BaseException) -> tuple[str, str]:
    """The kind (pipeline.errors, which gives the exit code) and the message of a failure that ended a command: a
    user's (bad input, setup, storage) is one line; a bug is "internal"."""
    from pipeline.errors import PidrayError, kind_of

    if isinstance(e, PidrayError) or isinstance(e, ValueError):
        return kind_of(e), str(e)
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return "setup", str(e)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return "internal", str(e)
    if isinstance(e, (BotoCoreError, ClientError)):
        from pipeline.storage import explain_storage_error

        return "setup", explain_storage_error(e, "use", "S3")
    return "internal", str(e)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `pidray`: what it does and its commands
        parser.print_help()
        return 0
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
        from pipeline.errors import exit_code

        kind, message = _failure(e)
        if kind == "internal":  # a bug: still no wall of text, but the way to see it
            print(f"pidray {args.cmd}: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                  file=sys.stderr)  # fmt: skip
        else:  # user errors: one clear line
            print(f"pidray {args.cmd}: error: {message}", file=sys.stderr)
        return exit_code(kind)


if __name__ == "__main__":
    sys.exit(main())
