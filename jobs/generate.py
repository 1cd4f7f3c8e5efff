"""`pidray generate`: PixelDiT text-to-image, one prompt to a file or a prompt file to a folder (the bulk job), with
an optional PiD upscale of each image."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import TYPE_CHECKING

from jobs.upscale import report, seed_arg, size_arg
from pipeline.errors import SetupError, exit_code
from pipeline.storage import S3Settings

if TYPE_CHECKING:
    from jobs.pipeline import JobConfig

# What the job runs on (jobs.pipeline, pipeline.runtime, pipeline.stages) loads torch: imported where the job starts,
# so that the parser, --help and usage errors answer at once.


def add_generate_parser(sub, parents=()) -> None:
    p = sub.add_parser("generate", parents=list(parents))  # its summary: pidray.cli.COMMANDS
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --prompts)")
    p.add_argument("out", help="output file (one prompt) or folder / s3:// prefix (--prompts)")
    from pipeline.generate_options import GEN_DEFAULTS, GEN_OPTS, GEN_OVERRIDES

    p.add_argument("--prompts", default=None, help="prompt file: text (a prompt a line), CSV or JSONL with "
                   f"prompt, name, {', '.join(GEN_OVERRIDES)} (size: WxH)")  # fmt: skip
    m = p.add_argument_group("model")
    m.add_argument(
        "-m",
        "--model",
        "--preset",
        dest="preset",
        default=None,
        help="a text-to-image preset (default pixeldit-2k); with --with, the PiD preset that decodes",
    )
    m.add_argument("--weights", default=None, help="hub-layout weights folder, or a checkpoint file")
    m.add_argument("--text-encoder", default=None, help="local Gemma-2-2B-it folder")
    m.add_argument("--allow-download", action="store_true", help="download released weights (NVIDIA licence)")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    from pipeline.options import add_arguments

    g = p.add_argument_group("sampling (default: the preset's official settings)")
    parse = {"seed": seed_arg, "size": size_arg}
    sampling = [n for n in GEN_OPTS if n != "stop_at"]
    add_arguments(g, parse, GEN_OPTS, GEN_DEFAULTS, names=sampling)
    from pipeline.generators import generators_help

    w = p.add_argument_group("another text-to-image model's latent, decoded by PiD (-m: the PiD preset)")
    w.add_argument(
        "--with",
        dest="with_",
        default=None,
        metavar="MODEL",
        help=f"a generator: {generators_help()}; or a local diffusers folder of one of their classes (needs "
        "pidray[generate]; it takes the settings of its class's first name, NAME=DIR those of NAME, e.g. "
        "zimage-turbo=DIR). --steps, --size, --cfg-scale override its defaults",
    )
    add_arguments(w, parse, GEN_OPTS, GEN_DEFAULTS, names=["stop_at"])
    w.add_argument(
        "--generator-offload",
        action="store_true",
        help="keep the generator's models in CPU memory, each on the GPU while it runs (a 24 GB card)",
    )
    u = p.add_argument_group("upscale each image with PiD in the same run")
    u.add_argument("--upscale", default=None, metavar="PRESET", help="a PiD preset (e.g. flux-2kto4k-v1.5)")
    u.add_argument("--upscale-weights", default=None, help="its weights folder (default: --weights)")
    u.add_argument("--upscale-steps", type=int, default=None, help="default: the upscale preset's")
    o = p.add_argument_group("output and job")
    o.add_argument("-f", "--format", default="png", help="png, jpeg, webp, tiff")
    o.add_argument("-q", "--quality", type=int, default=95)
    run = o.add_mutually_exclusive_group()
    run.add_argument("--local", dest="local", action="store_const", const=True, default=None)
    run.add_argument("--ray", dest="local", action="store_const", const=False)
    o.add_argument("--resume", action="store_true", help="skip prompts whose output is already there")
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="--prompts: replace outputs already in DST, only those DST's manifest records as pidray's",
    )
    o.add_argument("--s3-endpoint", default=None)
    o.add_argument("--s3-region", default=None)
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--verbose", action="store_true")
    p.set_defaults(fn=cmd_generate)


def _fields(args, src: str, dst: str) -> dict:
    """The job's `JobConfig` fields from the command line, each checked that can be before its workflow is
    resolved (building the config resolves it)."""
    from pipeline.generate_options import GEN_OPTS
    from pipeline.options import from_args
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions

    gen = {k: v for k, v in from_args(args, GEN_OPTS).items() if v is not None}
    if args.with_ is not None and not args.with_.strip():  # `--with=` or `--with "$UNSET"`: never PixelDiT instead
        raise SetupError("--with needs a generator name or a folder")
    if (args.stop_at is not None or args.generator_offload) and not args.with_:
        raise SetupError("--stop-at and --generator-offload are for --with MODEL (generate-then-decode)")
    from pipeline.generate_options import GenerateOptions

    GenerateOptions.from_dict(gen)  # ranges checked before anything starts
    preset = args.preset or "pixeldit-2k"
    if args.with_:  # the generator checked (a folder's class too) before anything loads
        from pipeline.generators import generator_spec

        spec = generator_spec(args.with_)[0]
        preset = args.preset or spec.preset  # the PiD preset for the model's latents
    model = ModelOptions(preset, args.weights, args.text_encoder, args.allow_download, args.device, args.dtype)
    if args.with_ and args.upscale:
        raise SetupError("--with decodes the latent with PiD already; --upscale is for PixelDiT images")
    up = None
    if args.upscale:
        up = ModelOptions(args.upscale, args.upscale_weights or args.weights, args.text_encoder, args.allow_download,
                          args.device, args.dtype)  # fmt: skip
    options = UpscaleOptions(steps=args.upscale_steps, seed=args.seed, format=args.format, quality=args.quality)
    from pipeline.imageio import output_format

    output_format(None, args.format)
    return dict(src=src, dst=dst, model=model, options=options, local=args.local, progress=not args.no_progress,
                verbose=args.verbose, resume=args.resume, overwrite=args.overwrite,
                workflow="ldm" if args.with_ else "generate", gen=gen, upscale=up, ldm=args.with_,
                generator_offload=args.generator_offload, s3=S3Settings(args.s3_endpoint, args.s3_region))  # fmt: skip


def _config(args, src: str, dst: str) -> JobConfig:
    """A --prompts job's config; its flags checked first, its workflow resolved as it is built."""
    from jobs.pipeline import JobConfig
    from jobs.preflight import refuse_resume_with_overwrite

    fields = _fields(args, src, dst)
    refuse_resume_with_overwrite(args.resume, args.overwrite)
    return JobConfig(**fields)


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise SetupError("give one PROMPT and an output file, or --prompts FILE and an output folder")
    if args.prompts:
        from jobs.pipeline import run_job

        return report(run_job(_config(args, args.prompts, args.out)), per="prompts")
    return _one(args)


def _one(args) -> int:
    """One prompt -> OUT, through the same graph (in this process); OUT is never overwritten."""
    from pipeline.graph import StageGraph

    out = os.path.abspath(args.out)
    if args.overwrite:
        raise SetupError("--overwrite is for --prompts jobs: a single image's OUT is never overwritten")
    if os.path.exists(out) or os.path.islink(out):
        raise SetupError(f"{args.out} exists: pidray never overwrites a file; choose another name")
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    if ext:
        args.format = {"jpg": "jpeg", "tif": "tiff"}.get(ext, ext)
    fields = _fields(args, "-", out)
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise SetupError(f"folder {parent} does not exist")
    from jobs.pipeline import JobConfig, preflight

    cfg = JobConfig(**fields, dry_run=True)  # preflight without the DST probe (OUT is a file)
    graph = StageGraph(workflow=preflight(cfg))
    (row,) = list(graph.run_local([{"key": "prompt", "prompt": args.prompt, "seed": args.seed}]))
    if row.get("status") != "ok":
        print(f"pidray generate: failed: {row.get('error')}", file=sys.stderr)
        return exit_code("rows_failed")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(out)}.", suffix=".pidray.part")  # our own
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(row["output"])
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an output is an ordinary file
        os.link(tmp, out)  # fails if OUT appeared meanwhile: never overwrite
    except FileExistsError:
        raise SetupError(f"{args.out} appeared while generating: pidray never overwrites a file") from None
    finally:
        os.unlink(tmp)
    h, w = row["out_hw"]
    print(f"wrote {args.out} ({w}x{h}, seed {row.get('seed', args.seed)}, "
          + ", ".join(f"{k} {v:.1f}s" for k, v in row.get("timings", {}).items()) + ")")  # fmt: skip
    return 0


__all__ = ["add_generate_parser", "cmd_generate"]
