"""`pidray upscale SRC DST`: a file, folder or s3:// prefix in, the same tree out (Ray Data or the local loop)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import exit_code
from pipeline.options import add_arguments as add_option_arguments
from pipeline.options import from_args as options_from_args
from pipeline.storage import S3Settings

if TYPE_CHECKING:
    from jobs.pipeline import JobConfig

# What the job runs on (jobs.pipeline, pipeline.runtime, pipeline.stages) loads torch: imported where the job starts,
# so that the parser, --help and usage errors answer at once.


def read_captions(path: str) -> dict[str, str]:
    """key -> caption from a CSV (columns key,caption) or JSONL ({"key": ..., "caption": ...}) file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"caption manifest not found: {path}")
    out = {}
    if p.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                    out[str(item["key"])] = str(item["caption"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with key and caption ({e})") from None
    else:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"key", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: CSV needs the columns key,caption; got {reader.fieldnames}")
            out = {r["key"]: r["caption"] for r in reader}
    return out


def whole_arg(text: str, least: int, expected: str = "a whole number", below: str = "") -> int:
    """A whole-number flag value of at least `least`; argparse's error otherwise ("expected ...", or `below`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{below or f'must be at least {least}'}, got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_arg(text, 1)


def seed_arg(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    from pipeline.values import check_seed

    try:
        return check_seed(seed)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def suffix_arg(text: str) -> str:
    if "/" in text or "\x00" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"a suffix is part of a file name: no '/' or NUL, got {text!r}")
    return text


def size_arg(text: str) -> tuple[int, int]:
    """WxH -> (H, W)."""
    from pipeline.stages.common import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_upscale_parser(sub, parents=()) -> None:
    p = sub.add_parser("upscale", parents=list(parents))  # its summary: pidray.cli.COMMANDS
    p.add_argument("src", help="file, folder or s3://bucket/prefix")
    p.add_argument("dst", help="folder or s3://bucket/prefix; with one SRC file, also a file name (out.png)")
    _job_arguments(p, default_preset="small")
    from jobs.datasets import add_dataset_arguments

    add_dataset_arguments(p)  # WebDataset shards, Parquet tables
    p.set_defaults(fn=cmd_upscale, workflow="upscale")


def add_decode_parser(sub, parents=()) -> None:
    from pipeline.latents import FORMATS

    p = sub.add_parser("decode", parents=list(parents))
    p.add_argument("src", help="latent file, folder or s3://bucket/prefix")
    p.add_argument("dst", help="folder or s3://bucket/prefix")
    d = p.add_argument_group("latents")
    d.add_argument(
        "--latent-format",
        default=None,
        choices=sorted(FORMATS),
        help="what the files hold (default: the file's metadata, else the preset's VAE)",
    )
    d.add_argument(
        "--size",
        type=size_arg,
        default=None,
        help="output WIDTHxHEIGHT (default: latent size x the VAE factor x the preset's scale)",
    )
    d.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="the latents are x_t captured at this scheduler sigma (default: the file's, else clean)",
    )
    _job_arguments(p, default_preset="flux-2k")
    from jobs.datasets import add_dataset_arguments

    add_dataset_arguments(p, latents=True)  # WebDataset shards, Parquet tables of latent files
    p.set_defaults(fn=cmd_upscale, workflow="decode")  # fmt: skip


def _job_arguments(p, default_preset: str) -> None:
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", "--preset", dest="preset", default=default_preset, help="preset (pidray presets)")
    m.add_argument("--weights", default=None, help="hub-layout weights folder, or a checkpoint file")
    m.add_argument("--text-encoder", default=None, help="local Gemma-2-2B-it folder (released presets)")
    m.add_argument("--allow-download", action="store_true", help="download released weights (NVIDIA licence)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    m.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="compute precision; auto: bf16 on a GPU, fp32 on a CPU",
    )
    m.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp8"],
        help="fp8: e4m3 matmuls with per-channel/per-token scales (H100/H200 run them at 2x bf16)",
    )
    m.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the network (default: on CUDA only; warmed per tile shape before work)",
    )
    o = p.add_argument_group("upscaling")
    add_option_arguments(o, parse={"seed": seed_arg})  # every option of pipeline.options, in its declared order
    o.add_argument("--captions", default=None, help="per-file captions: CSV (key,caption) or JSONL")
    o.add_argument("--suffix", default="", type=suffix_arg, help="added to each output file name's stem")
    j = p.add_argument_group("job")
    run = j.add_mutually_exclusive_group()
    run.add_argument(
        "--local",
        dest="local",
        action="store_const",
        const=True,
        default=None,
        help="run in this process (the default for small jobs when RAY_ADDRESS is not set)",
    )
    run.add_argument("--ray", dest="local", action="store_const", const=False, help="Ray Data, whatever the size")
    j.add_argument("--verbose", action="store_true", help="let Ray's own messages through")
    j.add_argument("--resume", action="store_true",
                   help="skip inputs whose output is already complete (made with these settings; "
                        "--resume=redo-changed redoes outputs made with others)")  # fmt: skip
    j.add_argument(
        "--resume-mode",
        dest="resume_mode",
        choices=["keep", "redo-changed"],
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )  # what --resume=MODE sets (pidray.cli)
    j.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs already in DST, only those DST's manifest records as written by pidray",
    )
    j.add_argument("--manifest", default="", metavar="PATH",
                   help="one file to one named file: also write the job's manifest (Parquet) to PATH; otherwise "
                        "only the output file is written (a folder job's is DST/_pidray_manifest.parquet)")  # fmt: skip
    j.add_argument("--dry-run", action="store_true", help="list what would be done (as SRC is listed)")
    j.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="process only the first N planned inputs (to try a job)")  # fmt: skip
    j.add_argument("--in-place", action="store_true", help="DST is SRC: write beside the inputs (needs --suffix)")
    j.add_argument("--follow-symlinks", action="store_true", help="follow symbolic links in SRC (default: skip them)")
    j.add_argument("--include-hidden", action="store_true", help="also process files whose path has a '.' name")
    j.add_argument("--encode-actors", type=positive_int, default=None, help="encoder actors (default: 1 a GPU)")
    j.add_argument("--diffuse-actors", type=positive_int, default=None, help="diffusion actors (default: 1 a GPU)")
    j.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    j.add_argument("--s3-region", default=None, help="S3 region (default: the AWS configuration's)")
    j.add_argument("--s3-profile", default=None, help="AWS profile for S3 (default: the AWS configuration's)")
    j.add_argument(
        "--s3-retry-mode",
        default="standard",
        choices=["legacy", "standard", "adaptive"],
        help="botocore retry mode for S3",
    )
    j.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def config_from_args(args) -> JobConfig:
    from jobs.pipeline import JobConfig
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions
    from pipeline.workflow import DEFAULT_WORKFLOW

    options = UpscaleOptions(**options_from_args(args))
    if args.format:
        from pipeline.imageio import output_format

        output_format(None, args.format)  # validates the name up front
    model = ModelOptions(
        args.preset,
        args.weights,
        args.text_encoder,
        args.allow_download,
        args.device,
        args.dtype,
        precision=getattr(args, "precision", "auto"),
        compile=getattr(args, "compile", None),
    )
    cfg = JobConfig(
        src=args.src, dst=args.dst, model=model, options=options,
        s3=S3Settings(args.s3_endpoint, args.s3_region, args.s3_profile, args.s3_retry_mode),
        suffix=args.suffix, in_place=args.in_place, follow_symlinks=args.follow_symlinks,
        include_hidden=args.include_hidden, captions=read_captions(args.captions) if args.captions else {},
        resume=_resume(args), overwrite=args.overwrite, dry_run=args.dry_run, local=args.local,
        concurrency={k: v for k, v in (("encode", args.encode_actors), ("diffuse", args.diffuse_actors)) if v},
        progress=not args.no_progress, verbose=args.verbose, workflow=getattr(args, "workflow", DEFAULT_WORKFLOW),
        latent_format=getattr(args, "latent_format", None), out_size=getattr(args, "size", None),
        sigma=getattr(args, "sigma", None), limit=getattr(args, "limit", None), manifest=getattr(args, "manifest", ""),
    )  # fmt: skip
    # the job's workflow was resolved as it was built; its options resolved here, where the job enters: steps,
    # --cfg-scale, --shift and --ensemble refused up front where the preset's sampler or network cannot take them
    cfg.flow.resolved
    return cfg


def _note_ignored_captions(cfg) -> None:
    """--caption/--captions with a preset that has no caption encoder: said once, not ignored silently."""
    if (cfg.options.caption or cfg.captions) and not cfg.flow.preset.captioned:
        print(f"pidray: note: preset {cfg.model.preset} has no caption encoder: --caption/--captions are ignored",
              file=sys.stderr)  # fmt: skip


def _resume(args) -> bool | str:
    """--resume: True; --resume=redo-changed: that mode (jobs/settings.py)."""
    return "redo-changed" if getattr(args, "resume_mode", "") == "redo-changed" else args.resume


def cmd_upscale(args) -> int:
    from jobs.pipeline import run_job
    from jobs.settings import check_resume
    from jobs.single import file_destination

    if hasattr(args, "dataset"):  # pidray upscale and decode have the dataset flags
        from jobs.datasets import dataset_of

        ds = dataset_of(args, note=lambda text: print(text, file=sys.stderr))
        if ds is not None:
            return _dataset_job(args, ds)
    cfg = file_destination(config_from_args(args))  # `pidray upscale one.png big.png` writes big.png
    cfg = check_resume(cfg, note=lambda text: print(text, file=sys.stderr))  # outputs made otherwise are not kept
    _note_ignored_captions(cfg)
    if cfg.dry_run:  # each planned line as SRC is listed (a folder at a time, by name within it)
        summary = run_job(cfg, on_row=_print_planned)
        print(f"dry run: {summary.planned} to do, {summary.skipped} skipped, {summary.failed} refused")
        return 0
    return report(run_job(cfg))


def _dataset_job(args, ds) -> int:
    from jobs.dataset_run import run_dataset_job
    from jobs.settings import check_resume

    cfg = check_resume(config_from_args(args), note=lambda text: print(text, file=sys.stderr))
    _note_ignored_captions(cfg)
    if cfg.dry_run:
        summary = run_dataset_job(cfg, ds, on_row=_print_planned)
        print(f"dry run: {summary.planned} to do, {summary.skipped} skipped, {summary.failed} refused")
        return 0
    return report(run_dataset_job(cfg, ds))


def _print_planned(r: dict) -> None:
    reason = f"  ({r['error']})" if r.get("error") else ""
    target = f" -> {r['output_key']}" if r.get("output_key") else ""
    print(f"{r['status']:8s} {r['key']}{target}{reason}", flush=True)


def report(summary, per: str = "images") -> int:
    """A finished job for the terminal (failed inputs, the summary line, how to finish) -> the exit code."""
    failures = getattr(summary, "failures", None)
    if failures is None:
        failures = [r for r in summary.rows if r["status"] == "failed"]
    shown = getattr(summary, "failures_shown", False)  # each said as it happened
    for r in failures if not shown else ():
        print(f"failed  {r['key']}: {r['error']}", file=sys.stderr)
    if not shown and summary.failed > len(failures):
        print(f"... and {summary.failed - len(failures)} more failed (pidray status DST lists them)", file=sys.stderr)
    print(summary.line().replace("images/s", f"{per}/s"))
    if summary.interrupted:
        print("rerun the same command with --resume to finish", file=sys.stderr)
        return 128 + summary.interrupted  # 130 for Ctrl-C, 143 for SIGTERM
    return exit_code("rows_failed" if summary.failed else "ok")  # some inputs failed: listed above, in the manifest
