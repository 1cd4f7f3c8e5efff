"""Latents against a preset: the latent formats each VAE family decodes (`FORMATS`, from `pipeline.families`),
whether a preset takes latents at all, a latent's channels and a captured x_t's sigma for it, and the output-size
limit checked from a file's header (`output_limit`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pipeline.errors import BadInput, BadParameter
from pipeline.families import FORMATS, format_family


def output_limit(preset, options, out_size=None) -> Callable[[tuple], None]:
    """A latent's [C, h, w] checked against the output-size limit the encode stage applies to the output it stands
    for (latent × the VAE factor × the preset's scale, then `options.scale`; options.max_output_side), so a latent
    whose output would be refused is refused from its file's header, before its data is read or inflated. With an
    explicit output size (out_size), that size is what the encode stage checks, and this check passes."""
    from pipeline.tiling import check_output_side, target_size

    unit, sr, side = preset.lq_unit, preset.scale, options.max_output_side

    def check(chw: tuple) -> None:
        if out_size:
            return
        in_hw = (chw[1] * unit, chw[2] * unit)
        check_output_side((in_hw[0] * sr, in_hw[1] * sr), side)
        check_output_side(target_size(in_hw, sr, options.scale), side)

    return check


def check_format(fmt: str | None, preset) -> None:
    """A latent format named by the file or the user must be the preset's VAE family."""
    if fmt is None:
        return
    family = format_family(fmt)
    if family is None:
        raise BadParameter(f"unknown latent format {fmt!r}: one of {', '.join(sorted(FORMATS))}")
    if family.name != preset.family.name:
        fits = sorted(preset.family.latent_formats)
        raise BadInput(f"latent format {fmt!r} ({family.name} VAE) does not fit preset {preset.name!r}, which "
                       f"decodes {preset.vae} latents ({', '.join(fits) or 'none'}); choose a preset for "
                       f"{family.name}")  # fmt: skip


def check_decodes(preset) -> None:
    """BadParameter unless the preset takes latents in place of its LQ encoder."""
    if not preset.decodes_latents:
        raise BadParameter(
            f"preset {preset.name!r} has no latent decoder ({preset.vae} conditioning): pidray decode "
            "takes a VAE preset (flux-2k, sd3-2k, sdxl-2kto4k, flux2-2k, qwenimage-2kto4k-v1.5, ...)"
        )


def check_latent(latent: np.ndarray, preset) -> None:
    want = preset.latent_channels
    check_decodes(preset)
    if latent.shape[0] != want:
        hint = f" ({preset.family.hint})" if preset.family.hint else ""
        raise BadInput(f"latent has {latent.shape[0]} channels; preset {preset.name!r} ({preset.vae}) takes "
                       f"{want}{hint}")  # fmt: skip


def check_sigma(sigma, preset, what: str = "sigma") -> float:
    """A captured x_t's scheduler sigma, checked for the preset: a finite number >= 0, at most 1 for flow-matching
    presets (SDXL's Euler sigma has no upper bound). BadParameter naming `what` (a flag, a field) otherwise."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise BadParameter(f"{what} must be a finite number >= 0, got {sigma!r}")
    if not preset.noise.variance_preserving and sigma > 1.0:
        raise BadParameter(f"{what} {sigma} is outside [0, 1], the flow-matching range of preset {preset.name!r}")
    return float(sigma)


def to_training_frame(latent: np.ndarray, sigma: float | None, preset) -> tuple[np.ndarray, float | None]:
    """A captured x_t moved to the frame the checkpoint was trained in (identity for flow-matching presets)."""
    if sigma is None:
        return latent, None
    sigma = check_sigma(sigma, preset)
    if preset.noise.variance_preserving:  # SDXL: Euler's x0 + σε -> VP sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε
        d = math.sqrt(sigma * sigma + 1.0)
        return (latent / d).astype(np.float32), sigma / d
    return latent, sigma
