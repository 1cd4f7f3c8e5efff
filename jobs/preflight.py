"""Everything that can make a whole job fail, checked before any worker starts or any model loads."""

from __future__ import annotations

import os
from dataclasses import replace

from jobs.config import JobConfig
from pipeline.errors import SetupError
from pipeline.storage import Location
from pipeline.workflow import Ldm, Workflow


def preflight(cfg: JobConfig) -> Workflow:
    """Everything that can make the whole job fail, checked before any worker starts or any model loads.

    In the order a user can act on: the preset's encoder exists, options fit the preset, the device exists,
    SRC can be listed, DST can be written (a probe write + delete), the weights are there. Each failure is one
    SetupError line: what, where, how to fix. Returns the job's workflow, resolved.
    """
    from pipeline.runtime import check_device, check_encoder, net_path
    from pipeline.stages.encode import plan_for
    from pipeline.weights import WeightsNotFound, resolve

    refuse_resume_with_overwrite(cfg.resume, cfg.overwrite)
    wf = cfg.flow
    preset = wf.preset
    decode = wf.reads_latents
    if not wf.reads_files:
        _preflight_generate(cfg, wf)
        return wf
    if not preset.upscales:
        raise SetupError(f"preset {preset.name!r} is a text-to-image model: use pidray generate")
    if decode:  # latents replace the LQ encoder: the preset must take them, in the format named
        from pipeline.latents import check_decodes, check_format

        try:
            check_decodes(preset)
        except ValueError as e:
            raise SetupError(str(e)) from None
        check_format(cfg.latent_format, preset)
        _check_decode_flags(cfg, preset)
    else:
        check_encoder(preset)  # "not implemented" before asking for weights the preset cannot use anyway
    side = preset.envelope[1] * 3 // max(1, preset.scale)  # an input that needs several tiles checks --overlap
    plan_for(preset, replace(cfg.options, max_output_side=1 << 30), (side, side))
    if cfg.local or not os.environ.get("RAY_ADDRESS"):  # a remote cluster's workers have their own devices
        check_device(cfg.model.device)
    Location(cfg.src, cfg.s3).check_listable()
    if not cfg.dry_run:
        Location(cfg.dst, cfg.s3).check_writable()
    missing = []  # everything the preset needs that is not here, said at once: the network + VAE, the captioner
    try:
        if not decode and not preset.bundled and not str(cfg.model.weights or "").endswith((".safetensors", ".pth")):
            # the network and the LQ encoder's files, all missing ones at once (a decode job needs no encoder)
            resolve(preset, cfg.model.weights, allow_download=cfg.model.allow_download)
        path = net_path(cfg.model, preset)
        if not os.path.isfile(path):
            missing.append(f"checkpoint not found: {path}")
    except WeightsNotFound as e:
        missing.append(str(e))
    _raise_missing(missing, cfg, preset)
    return wf


def refuse_resume_with_overwrite(resume, overwrite) -> None:
    """--resume with --overwrite: one SetupError (a front end checks it before it builds the job's config)."""
    if overwrite and resume:
        raise SetupError("--overwrite and --resume contradict each other: --resume keeps the outputs already in DST, "
                         "--overwrite replaces them; choose one")  # fmt: skip


def _check_decode_flags(cfg: JobConfig, preset) -> None:
    """`pidray decode --sigma` and `--size`, checked for the preset before any model loads (SetupError naming the
    flag): every row would fail with them otherwise."""
    from pipeline.latents import check_sigma
    from pipeline.stages.encode import given_latent_in_hw

    try:
        if cfg.sigma is not None:
            check_sigma(cfg.sigma, preset, "--sigma")
        if cfg.out_size is not None:
            h, w = cfg.out_size
            if max(h, w) > cfg.options.max_output_side:
                raise ValueError(f"output side {max(h, w)} is over --max-output-side {cfg.options.max_output_side}")
            given_latent_in_hw(preset, None, cfg.out_size)
    except ValueError as e:
        flag = "" if str(e).startswith("--") else f"--size {cfg.out_size[1]}x{cfg.out_size[0]}: "
        raise SetupError(f"{flag}{e}") from None


def _raise_missing(missing: list[str], cfg: JobConfig, preset) -> None:
    """One SetupError naming everything missing at once (weights, and the caption encoder), each with its command."""
    from pipeline.weights import caption_encoder_missing, missing_message

    if preset.captioned and not cfg.model.text_encoder and not cfg.model.allow_download:
        missing.append(caption_encoder_missing(preset.name))
    if missing:
        raise SetupError(missing_message(missing))


def _preflight_generate(cfg: JobConfig, wf: Workflow) -> None:
    """A prompt job: the preset generates, its (and the upscaler's) weights and caption encoder are here, DST is
    writable — each missing thing said at once."""
    from pipeline.runtime import check_device, net_path
    from pipeline.t2i import GenerateOptions
    from pipeline.weights import WeightsNotFound

    preset = wf.preset
    if isinstance(wf, Ldm):  # generate-then-decode: a PiD preset that decodes the model's latents
        from pipeline.latents import check_format
        from pipeline.stages.ldm import ldm_spec

        spec, _ = ldm_spec(wf.ldm)
        if not preset.upscales:
            raise SetupError(f"--with decodes with a PiD preset (-m), not {preset.name!r}")
        try:
            check_format(spec.family, preset)
        except ValueError as e:
            raise SetupError(str(e)) from None
        GenerateOptions.from_dict(cfg.gen).resolved(preset, spec.defaults())
    elif not preset.generates_images:
        raise SetupError(
            f"preset {preset.name!r} does not generate images: pidray generate takes pixeldit-2k (or a "
            "preset file with task 't2i'), or --with MODEL to decode a latent diffusion model's latents"
        )
    else:
        GenerateOptions.from_dict(cfg.gen).resolved(preset)  # size, steps, ... fit the preset
    if cfg.local or not os.environ.get("RAY_ADDRESS"):
        check_device(cfg.model.device)
    if not cfg.dry_run:
        Location(cfg.dst, cfg.s3).check_writable()
    missing = []
    for model, model_preset in wf.models():
        try:
            path = net_path(model, model_preset)
            if not os.path.isfile(path):
                missing.append(f"checkpoint not found: {path}")
        except WeightsNotFound as e:
            missing.append(str(e))
    _raise_missing(missing, cfg, preset)
