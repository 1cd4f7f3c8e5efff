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
batch-norm normalised latent; Qwen-Image: (z − mean)/std). Packed sequence latents (Flux pipelines'
`output_type="latent"`) must be unpacked first (`FluxPipeline._unpack_latents`).

`sigma` marks a captured x_t: the latent is already noised to that level, so PiD conditions on it with
`degrade_sigma = sigma` and adds no noise (the official `from_ldm` path). Flow-matching generators use
x_t = (1 − σ)·x0 + σ·ε as PiD does; SDXL's Euler scheduler keeps x_t = x0 + σ·ε, which is moved to the
variance-preserving frame the SDXL checkpoint was trained in: x / √(σ² + 1), σ / √(σ² + 1).
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from pipeline.errors import BadInput, BadParameter

LATENT_EXTENSIONS = (".safetensors", ".npy", ".npz")
# --format name -> the VAE family whose presets decode it
FORMATS = {"flux": "flux1", "zimage": "flux1", "flux1": "flux1", "sd3": "sd3", "sdxl": "sdxl", "flux2": "flux2",
           "qwenimage": "qwenimage"}  # fmt: skip
MAX_LATENT_ELEMS = 1 << 28  # 1 GiB of fp32: far beyond any 16K output's latent
MAX_HEADER = 16 << 20


def is_latent_key(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in LATENT_EXTENSIONS


@dataclass
class LatentItem:
    id: str | None
    latent: np.ndarray  # [C, h, w] float32
    caption: str | None = None
    sigma: float | None = None
    format: str | None = None


# ------------------------------------------------------------------------------------------------ reading
def _st_header(data: bytes) -> tuple[dict, int]:
    if len(data) < 8:
        raise BadInput("not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise BadInput(f"not a readable safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise BadInput(f"not a readable safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise BadInput("not a readable safetensors file (header is not an object)")
    return header, n


def header_ids(name: str, head: bytes) -> list[str] | None:
    """The latent ids of a file from its first bytes when they tell (a safetensors header), else None (read it all).
    [""] means one latent without an id."""
    if not name.lower().endswith(".safetensors"):
        return None
    if len(head) >= 8:
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n > len(head):
            return None
    header, _ = _st_header(head)
    meta = header.get("__metadata__") or {}
    tensors = [k for k in header if k != "__metadata__"]
    return _ids_of(tensors, {k: header[k].get("shape", []) for k in tensors}, meta)


def _ids_of(names: list[str], shapes: dict[str, list], meta: dict) -> list[str]:
    if len(names) > 1:
        return sorted(names)
    if not names:
        raise BadInput("the file holds no tensor")
    shape = list(shapes[names[0]])
    if len(shape) == 4 and shape[0] > 1:
        ids = _meta_json(meta, "ids")
        if ids is None:
            raise BadInput(f"a batch of {shape[0]} latents without ids: give the ids in the metadata (\"ids\": a JSON "
                           "list), or save one named tensor per latent (or one latent per file)")  # fmt: skip
        if not isinstance(ids, list) or len(ids) != shape[0] or not all(isinstance(i, str) and i for i in ids):
            raise BadInput(f"metadata 'ids' must be a list of {shape[0]} non-empty strings")
        if len(set(ids)) != len(ids):
            raise BadInput("metadata 'ids' has duplicates")
        return ids
    return [""]


def _meta_json(meta: dict, key: str):
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except ValueError:
        raise BadInput(f"metadata {key!r} is not JSON") from None


def read_latents(name: str, data: bytes, want: str | None = None) -> list[LatentItem]:
    """The latents of a file — only the one with id `want` when given — validated for shape and values (not yet
    against a preset): one bad latent of a batch file fails only itself."""
    ext = PurePosixPath(name).suffix.lower()
    if ext == ".safetensors":
        items = _read_safetensors(data)
    elif ext == ".npy":
        items = [LatentItem(None, _load_npy(data))]
    elif ext == ".npz":
        items = _read_npz(data)
    else:
        raise BadInput(f"not a latent file ({', '.join(LATENT_EXTENSIONS)}): {name}")
    if want:
        items = [it for it in items if it.id == want]
        if not items:
            raise BadInput(f"no latent {want!r} in the file")
    for it in items:
        it.latent = _as_chw(it.latent, it.id)
    return items


def _read_safetensors(data: bytes) -> list[LatentItem]:
    import torch
    from safetensors.torch import load

    header, _ = _st_header(data)
    meta = header.get("__metadata__") or {}
    names = [k for k in header if k != "__metadata__"]
    ids = _ids_of(names, {k: header[k].get("shape", []) for k in names}, meta)
    for k in names:
        shape = header[k].get("shape", [])
        if math.prod(shape) > MAX_LATENT_ELEMS:
            raise BadInput(f"tensor {k!r} has {math.prod(shape):,} elements, over the limit of {MAX_LATENT_ELEMS:,}")
    try:
        tensors = load(bytes(data))
    except Exception as e:
        raise BadInput(f"not a readable safetensors file ({e})") from None
    captions, sigmas = _meta_json(meta, "captions") or {}, _meta_json(meta, "sigmas") or {}
    if not isinstance(captions, dict) or not isinstance(sigmas, dict):
        raise BadInput("metadata 'captions' and 'sigmas' must be JSON objects (id -> value)")
    common = {"caption": meta.get("caption"), "sigma": _float(meta.get("sigma"), "sigma"), "format": meta.get("format")}

    def arr(t: torch.Tensor) -> np.ndarray:
        if not t.is_floating_point():
            raise BadInput(f"latents must be floating point, got {t.dtype}")
        return t.float().numpy()

    if len(names) == 1 and ids != [""]:  # one [N, C, h, w] tensor with ids in the metadata
        batch = arr(tensors[names[0]])
        pairs = [(i, batch[n]) for n, i in enumerate(ids)]
    elif len(names) == 1:
        pairs = [(None, arr(tensors[names[0]]))]
    else:
        pairs = [(k, arr(tensors[k])) for k in ids]
    return [LatentItem(i, a, captions.get(i, common["caption"]) if i else common["caption"],
                       _float(sigmas.get(i), "sigma") if i and i in sigmas else common["sigma"], common["format"])
            for i, a in pairs]  # fmt: skip


def _read_array(f, what: str) -> np.ndarray:
    """One .npy stream: its header checked (no pickles, a size within the limit) before any data is allocated."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(f)
        read_header = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
        shape, _, dtype = read_header(f)  # the header only: nothing allocated yet
    except Exception as e:
        raise BadInput(f"not a readable {what} ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise BadInput(f"{what} holds Python objects (a pickle), which pidray never loads")
    if math.prod(shape) > MAX_LATENT_ELEMS:
        raise BadInput(f"{what} has {math.prod(shape):,} elements, over the limit of {MAX_LATENT_ELEMS:,}")
    f.seek(0)
    try:
        return npf.read_array(f, allow_pickle=False)
    except Exception as e:
        raise BadInput(f"not a readable {what} ({type(e).__name__}: {e})") from None


def _load_npy(data: bytes) -> np.ndarray:
    a = _read_array(io.BytesIO(data), ".npy file")
    if a.ndim == 4 and a.shape[0] > 1:
        raise BadInput(f"a batch of {a.shape[0]} latents without ids: save an .npz with one named array per latent, "
                       "or one latent per file")  # fmt: skip
    return a


def _npz_members(data: bytes):
    import zipfile

    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = [n for n in z.namelist() if n.endswith(".npy")]
    except Exception as e:
        raise BadInput(f"not a readable .npz file ({type(e).__name__}: {e})") from None
    if len(names) > 100_000:
        raise BadInput(f"the .npz holds {len(names):,} arrays, over the limit of 100,000")
    return z, names


def _read_npz(data: bytes) -> list[LatentItem]:
    z, names = _npz_members(data)
    arrays = {}
    for n in names:
        with z.open(n) as f:  # streamed: the header is checked before the member is inflated
            arrays[n[: -len(".npy")]] = _read_array(f, f".npz member {n!r}")
    special = {k: arrays.pop(k) for k in list(arrays) if k.startswith("__")}
    if not arrays:
        raise BadInput("the .npz holds no latent")
    caption = str(special["__caption__"]) if "__caption__" in special else None
    fmt = str(special["__format__"]) if "__format__" in special else None
    sigma = _float(special["__sigma__"].item() if "__sigma__" in special else None, "__sigma__")
    return [LatentItem(k, arrays[k], caption, sigma, fmt) for k in sorted(arrays)]


def npz_ids(data: bytes) -> list[str]:
    _, names = _npz_members(data)
    ids = sorted(n[: -len(".npy")] for n in names if not n.startswith("__"))
    if not ids:
        raise BadInput("the .npz holds no latent")
    return ids


def _float(v, what: str) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BadInput(f"{what} must be a number, got {v!r}") from None
    if not math.isfinite(f) or f < 0:
        raise BadInput(f"{what} must be a finite number >= 0, got {v!r}")
    return f


def _as_chw(a: np.ndarray, id_: str | None) -> np.ndarray:
    what = f"latent {id_!r}" if id_ else "latent"
    if not np.issubdtype(a.dtype, np.floating):
        raise BadInput(f"{what} must be floating point, got {a.dtype}")
    shape = a.shape
    if a.ndim == 5 and a.shape[0] == 1:  # [1, C, T, h, w]
        a = a[0]
    if a.ndim == 4 and a.shape[0] == 1:  # [1, C, h, w]
        a = a[0]
    elif a.ndim == 4 and a.shape[1] == 1:  # a video latent with one frame: [C, 1, h, w]
        a = a[:, 0]
    if a.ndim != 3:
        raise BadInput(f"{what} must be [C, h, w] (or [1, C, h, w]), got shape {list(shape)}")
    if min(a.shape) < 1:
        raise BadInput(f"{what} has an empty dimension: {list(shape)}")
    if a.size > MAX_LATENT_ELEMS:
        raise BadInput(f"{what} has {a.size:,} elements, over the limit of {MAX_LATENT_ELEMS:,}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise BadInput(f"{what} contains NaN or Inf")
    return a


# ------------------------------------------------------------------------------------------------ against a preset
def check_format(fmt: str | None, preset) -> None:
    """A latent format named by the file or the user must be the preset's VAE family."""
    if fmt is None:
        return
    family = FORMATS.get(str(fmt).lower())
    if family is None:
        raise BadParameter(f"unknown latent format {fmt!r}: one of {', '.join(sorted(FORMATS))}")
    if family != preset.vae:
        fits = sorted({n for n, f in FORMATS.items() if f == preset.vae})
        raise BadInput(f"latent format {fmt!r} ({family} VAE) does not fit preset {preset.name!r}, which decodes "
                       f"{preset.vae} latents ({', '.join(fits) or 'none'}); choose a preset for {family}")  # fmt: skip


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
        hint = " (Flux2: the 128-channel patchified, batch-norm normalised latent)" if preset.vae == "flux2" else ""
        raise BadInput(f"latent has {latent.shape[0]} channels; preset {preset.name!r} ({preset.vae}) takes "
                       f"{want}{hint}")  # fmt: skip


def check_sigma(sigma, preset, what: str = "sigma") -> float:
    """A captured x_t's scheduler sigma, checked for the preset: a finite number >= 0, at most 1 for flow-matching
    presets (SDXL's Euler sigma has no upper bound). BadParameter naming `what` (a flag, a field) otherwise."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise BadParameter(f"{what} must be a finite number >= 0, got {sigma!r}")
    if preset.latent_noise != "vp" and sigma > 1.0:
        raise BadParameter(f"{what} {sigma} is outside [0, 1], the flow-matching range of preset {preset.name!r}")
    return float(sigma)


def to_training_frame(latent: np.ndarray, sigma: float | None, preset) -> tuple[np.ndarray, float | None]:
    """A captured x_t moved to the frame the checkpoint was trained in (identity for flow-matching presets)."""
    if sigma is None:
        return latent, None
    sigma = check_sigma(sigma, preset)
    if preset.latent_noise == "vp":  # SDXL: Euler's x0 + σε -> VP sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε
        d = math.sqrt(sigma * sigma + 1.0)
        return (latent / d).astype(np.float32), sigma / d
    return latent, sigma
