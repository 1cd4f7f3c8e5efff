"""`pidray` command line: upscaling jobs, the endpoint, checkpoint tools and benchmarks.

Every subcommand is named here (COMMANDS, with its one-line summary); its options are added by the module that
runs it, imported only when that command is parsed, so `--help`, `--version` and usage errors answer without
loading torch or Ray. Here too: the shared flags, the did-you-mean hints, the error-to-exit-code handling and the first
line a command says on a terminal. The small model and checkpoint commands: `pidray.tools`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

DESCRIPTION = (
    "Upscale images with NVIDIA's PiD diffusion upscaler: a file, a folder or an s3:// prefix, on this machine or a "
    "Ray cluster, or behind an HTTP endpoint."
)

# Flags other upscalers (Real-ESRGAN, realesrgan-ncnn-vulkan) use that pidray spells differently or lacks: the hint
# ({flag}: the flag as typed) goes after "unrecognized arguments". Each is (hint, the pidray option it points to:
# given only where the command has that option; None: always).
_POSITIONAL = ("SRC and DST are positional, with no flag: pidray upscale in.png out.png", None)
_MODEL = ("choose the model with -m/--model (pidray presets lists them)", None)
_TTA = ("{flag} is another upscaler's test-time augmentation; pidray has none: its nearest is --ensemble, which "
        "averages in a second prediction made on a shifted grid", "--ensemble")  # fmt: skip
_FACE = ("{flag} is Real-ESRGAN's GFPGAN face pass; pidray has no face enhancement: one model upscales the whole "
         "image", None)  # fmt: skip
_PAD = ("{flag} is Real-ESRGAN's tile padding; pidray's tiles overlap by --overlap latent pixels and are blended",
        "--overlap")  # fmt: skip
FOREIGN_FLAGS = {
    "-i": _POSITIONAL, "--input": _POSITIONAL, "-o": _POSITIONAL, "--output": _POSITIONAL,
    "-n": _MODEL, "--model-name": _MODEL, "--model_name": _MODEL,
    "-x": _TTA, "--tta": _TTA,
    "-j": ("-j is realesrgan-ncnn-vulkan's load:proc:save thread counts; pidray sizes its workers itself; "
           "--encode-actors and --diffuse-actors set a Ray job's", "--diffuse-actors"),
    "-v": ("-v is realesrgan-ncnn-vulkan's verbose output; pidray's is --verbose, which lets Ray's own messages "
           "through", "--verbose"),
    "--face-enhance": _FACE, "--face_enhance": _FACE, "--tile_pad": _PAD, "--tile-pad": _PAD, "--pre_pad": _PAD,
    "--outscale": ("--outscale is Real-ESRGAN's output scale; pidray's is -s/--scale", "--scale"),
    "--ext": ("--ext is Real-ESRGAN's output extension; pidray's is -f/--format, by default the input's", "--format"),
    "--gpu-id": ("--gpu-id is Real-ESRGAN's GPU choice; pidray's is -g N or --device cuda:N", "--device"),
    "--model_path": ("--model_path is Real-ESRGAN's checkpoint; pidray's is --weights, a file or a weights folder",
                     "--weights"),
    "--alpha_upsampler": ("--alpha_upsampler is Real-ESRGAN's; pidray resizes an alpha channel with Lanczos", None),
}  # fmt: skip

# The commands, in the order `pidray --help` lists them (by use), each with its one-line summary and what adds its
# options: "module:function" (imported only when the command is parsed) or a function of this module's.
COMMANDS = {
    "upscale": ("upscale images: a file, a folder or an s3:// prefix into DST, keeping their names",
                "jobs.upscale:add_upscale_parser"),
    "decode": ("turn a generator's latents (.safetensors, .npy, .npz) into images with PiD",
               "jobs.upscale:add_decode_parser"),
    "generate": ("make images from text with PixelDiT, optionally upscaled: PROMPT OUT_FILE, or --prompts FILE DST",
                 "jobs.generate:add_generate_parser"),
    "serve": ("run the upscaling endpoint on this machine: an HTTP API and a web page", "serve.run:add_serve_parser"),
    "status": ("show a job's progress and failures from its manifest in DST, while it runs or after",
               "jobs.status:add_status_parser"),
    "presets": ("list the models: what each is for, and which are ready to run here",
                "pidray.tools:add_presets_parser"),
    "download": ("download a model's released weights (NVIDIA non-commercial licence)",
                 "pidray.tools:add_download_parser"),
    "doctor": ("check this machine: versions and attention backends; --gpu: every check (~7 min)",
               "pidray.tools:add_doctor_parser"),
}  # fmt: skip
# Tools for checkpoints, test fixtures and speed, listed under their own heading.
MAINTENANCE = {
    "golden": ("check golden fixture files against this implementation (exit 1 on any failure)",
               "pidray.tools:add_golden_parser"),
    "info": ("a model's parameter count and, with --keys, its checkpoint's tensor names and shapes",
             "pidray.tools:add_info_parser"),
    "convert": ("convert an official checkpoint (.pth) to a safetensors file, strictly validated",
                "pidray.tools:add_convert_parser"),
    "eval-small": ("measure the bundled small model against bicubic upscaling on held-out photos", "_add_eval_small"),
    "bench": ("benchmarks: the Ray job vs the in-process loop, endpoint latency, GPU kernels", "_add_bench"),
}  # fmt: skip


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

    def _format_action(self, action):
        if isinstance(action, argparse._SubParsersAction):  # its commands, a line each, with no line of its own
            return "".join(self._format_action(a) for a in action._get_subactions())
        return super()._format_action(action)


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
                hint, needs = FOREIGN_FLAGS[name]
                hint = hint.format(flag=name)
                if hint not in hints and (needs is None or needs in self._option_string_actions):
                    hints.append(hint)
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


class _Commands(argparse._SubParsersAction):
    """pidray's subcommands: each one's summary (its line in `pidray --help`, and the opening of its own --help)
    comes from COMMANDS or MAINTENANCE, whichever module adds its parser; the maintenance ones are listed under
    their own heading (`maintenance`, an argument group of the top-level parser)."""

    maintenance: argparse._ArgumentGroup | None = None

    def add_parser(self, name, **kw):
        summary = {**COMMANDS, **MAINTENANCE}[name][0]
        kw.setdefault("description", f"{summary[0].upper()}{summary[1:]}.")
        parser = super().add_parser(name, help=summary, **kw)
        if name in MAINTENANCE and self.maintenance is not None:  # its line moves under the heading
            self.maintenance._group_actions.append(self._choices_actions.pop())
        return parser


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
    "local": "run in this process (the default for small jobs when RAY_ADDRESS is not set)",
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
        opts["--tile"].help = ("tile side in output pixels; 0: automatic (the preset's: the output size it was trained "
                               "on, or a larger one where that is as good and faster)")  # fmt: skip


def _cmd_eval_small(args) -> int:
    from jobs.eval_small import main as eval_main

    return eval_main(args)


# ------------------------------------------------------------------ the options of the commands defined here
def _add_eval_small(sub, parents) -> None:
    p = sub.add_parser("eval-small", parents=parents)
    p.add_argument("--weights", default=None, help="a small-model safetensors file (default: the bundled one)")
    p.add_argument("--size", type=int, default=256, help="side of the centre crop of each photo, in pixels")
    p.add_argument("--runs", type=int, default=5, help="timed runs of the 256->1024 upscale")
    p.add_argument("--report", default="out/eval_small", help="folder for the side-by-side PNGs and JSON")
    p.add_argument(
        "--compare",
        default=None,
        help="another small-model safetensors file, measured side by side; 'previous': the bundled model's "
        "previous version",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: what each model was trained for, from its metadata)",
    )
    p.add_argument("--sweep", action="store_true",
                   help="find the fastest CPU settings (tile, tiles per call, threads) whose output stays within "
                   "45 dB PSNR of the model at its trained tile, one knob at a time")  # fmt: skip
    p.add_argument("--tiles", default="128,192,256,320,384", help="--sweep: tile sides to try (output pixels)")
    p.add_argument("--calls", default="1,2,4,8", help="--sweep: tiles per network call to try")
    p.add_argument("--threads", default="1", help="--sweep: thread counts to try besides all cores")
    p.set_defaults(fn=_cmd_eval_small)


def _add_bench(sub, parents) -> None:
    from pidray.bench import add_bench_parser

    add_bench_parser(sub)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `pidray` parser. With `only` (a command's name, or "" for none), just that command's options are added
    and the others are names with summaries: a command imports only its own module to parse its arguments, and
    `pidray --help` imports none."""
    ap = Parser(prog="pidray", description=DESCRIPTION, epilog="pidray COMMAND --help shows a command's options.")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    ap.add_argument("--version", action="version", version=f"pidray {version()}")
    common = argparse.ArgumentParser(add_help=False)  # --debug is accepted after the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(title="commands", dest="cmd", metavar="COMMAND", parser_class=Parser, action=_Commands)
    sub.maintenance = ap.add_argument_group("maintenance", "tools for checkpoints, reference fixtures and benchmarks")
    ap._action_groups.append(ap._action_groups.pop(1))  # the options after the commands
    for name, (_, where) in {**COMMANDS, **MAINTENANCE}.items():
        if only is not None and name != only:
            sub.add_parser(name)  # listed, and a choice; its options are not needed
        elif ":" in where:
            module, function = where.split(":")
            getattr(importlib.import_module(module), function)(sub, parents=[common])
        else:
            globals()[where](sub, [common])
    _finish(ap)
    return ap


def _command_in(argv: list[str]) -> str:
    """The command word of a `pidray` command line: its first argument that is not an option ("" when none; the
    top-level options take no value)."""
    return next((a for a in argv if not a.startswith("-")), "")


def _failure(e: BaseException) -> tuple[str, str]:
    """The kind (pipeline.errors' one table, which gives the exit code) and the message of a failure that ended a
    command: a user's (bad input, setup, storage) is one line; a bug is "internal"."""
    from pipeline.errors import command_kind, is_storage_error

    kind = command_kind(e)
    if kind == "setup" and is_storage_error(e):  # botocore's text is lines of jargon: what, where, how to fix
        from pipeline.storage import explain_storage_error

        return kind, explain_storage_error(e, "use", "S3")
    return kind, str(e)


def starting_line(args) -> str:
    """What a command does first, said before it: loading PyTorch and a model, or starting Ray, takes seconds (more
    on a busy machine) before its own first output. "" for the commands that answer at once."""
    cmd = args.cmd
    if cmd in ("upscale", "decode"):
        return f"pidray {cmd}: loading PyTorch and the {args.preset} model..."
    if cmd == "generate":
        return f"pidray generate: loading PyTorch and the {args.preset or 'pixeldit-2k'} model..."
    if cmd == "serve":
        return f"pidray serve: starting Ray and the endpoint ({args.preset} model) on {args.host}:{args.port}..."
    if cmd == "download":
        return f"pidray download: looking up {args.preset}..."
    if cmd in ("doctor", "golden", "info", "convert", "eval-small", "bench"):
        return f"pidray {cmd}: loading PyTorch..."
    return ""  # status, presets: their own output comes first


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_in(argv))
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `pidray`: what it does and its commands
        parser.print_help()
        return 0
    line = starting_line(args)
    if line and sys.stderr.isatty() and not getattr(args, "no_progress", False):  # a terminal: never seconds of silence
        print(line, file=sys.stderr, flush=True)
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
    except Exception as e:  # the command's failure, whatever it is: one line and its kind's exit code (command_kind)
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
