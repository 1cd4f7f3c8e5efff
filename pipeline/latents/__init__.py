"""Latent files for `pidray decode`: a generator's latent (or a captured x_t) handed to PiD instead of a VAE decoder.

Accepted files (never a pickle):
- `.safetensors`: one tensor (one latent), or several named tensors (a batch: the names are the ids), or one
  4-D tensor [N, C, h, w] with its ids in the metadata (`"ids": JSON list`). Optional metadata: `format`,
  `caption` (all latents) or `captions` (JSON object id -> caption), `sigma` or `sigmas` (JSON object id -> sigma).
- `.npy`: one latent.
- `.npz`: a batch, one named array per latent (the names are the ids); `__caption__`, `__sigma__`, `__format__`
  arrays (strings / a number) apply to every latent in the file.

A latent is [C, h, w] (also [1, C, h, w]; Qwen-Image's video latent [C, 1, h, w] or [1, C, 1, h, w] with one frame)
in the space the generator hands its VAE decoder *before* un-normalising — which is the space PiD's LQ encoders
produce (Flux/Z-Image: scale·(z − shift); SD3 likewise; SDXL: ×0.13025; Flux2: the 128-channel patchified,
batch-norm normalised latent; Qwen-Image: (z − mean)/std). Packed sequence latents (what Flux, Flux2 and Qwen-Image
pipelines return with `output_type="latent"`) are read as such with the formats `flux-packed`, `flux2-packed`,
`qwenimage-packed` (`packed`): [tokens, C] or [1, tokens, C], laid out by the generated image's size (metadata
`height`, `width`) or the output size asked for.

`sigma` marks a captured x_t: the latent is already noised to that level, so PiD conditions on it with
`degrade_sigma = sigma` and adds no noise (the official `from_ldm` path). Flow-matching generators use
x_t = (1 − σ)·x0 + σ·ε as PiD does; SDXL's Euler scheduler keeps x_t = x0 + σ·ε, which is moved to the
variance-preserving frame the SDXL checkpoint was trained in: x / √(σ² + 1), σ / √(σ² + 1).

The modules: `values` (the limits, `LatentItem`, the checks of a latent's shape, numbers and text), `containers` (the
bounded parsers of the three formats: safetensors headers, .npz zip directories, .npy headers), `file` (a file indexed
once: `LatentFile`, `open_latents`, `read_latents`), `packed` (packed sequences unpacked) and `preset` (latents
against a preset: formats, channels, sigma, the output-size limit). The names below are what other modules import.
"""

from pipeline.latents.containers import header_ids, latent_extension, st_header_bytes
from pipeline.latents.file import LatentFile, npz_ids, open_latents, read_latents
from pipeline.latents.packed import PACKED, Packing, flux2_normalised, is_packed, unpack
from pipeline.latents.preset import (
    FORMATS,
    check_decodes,
    check_format,
    check_latent,
    check_sigma,
    output_limit,
    to_training_frame,
)
from pipeline.latents.values import (
    LATENT_EXTENSIONS,
    MAX_LATENT_BYTES,
    MAX_LATENT_ELEMS,
    MAX_MEMBERS,
    LatentItem,
    is_latent_key,
)

__all__ = [
    "latent_extension",
    "FORMATS",
    "PACKED",
    "Packing",
    "LATENT_EXTENSIONS",
    "MAX_LATENT_BYTES",
    "MAX_LATENT_ELEMS",
    "MAX_MEMBERS",
    "LatentFile",
    "LatentItem",
    "check_decodes",
    "check_format",
    "check_latent",
    "check_sigma",
    "flux2_normalised",
    "header_ids",
    "is_latent_key",
    "is_packed",
    "npz_ids",
    "open_latents",
    "output_limit",
    "read_latents",
    "st_header_bytes",
    "to_training_frame",
    "unpack",
]
