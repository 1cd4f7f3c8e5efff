"""The text-to-image generators whose latents PiD decodes (`pidray generate --with NAME`): one record per name, the
official settings of each (resolution, steps, guidance, the call's extra arguments), what its `output_type="latent"`
hands out and holds between its steps, and the PiD preset that decodes it. Plain data, no torch: `pidray generate
--help` lists it.

The settings are those of the official `from_ldm` registry (nv-tlabs/PiD `pid/_src/inference/pipeline_registry.py`),
the presets its checkpoint registry pairs with each name (`checkpoint_registry.py`: Z-Image reuses the Flux student,
FLUX.2-klein the FLUX.2 one, Qwen-Image-2512 the Qwen-Image one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SetupError


@dataclass(frozen=True)
class Generator:
    name: str
    pipeline: str  # the diffusers class
    hub_id: str
    latent_format: str  # what `output_type="latent"` returns (pipeline.latents.FORMATS, or "flux2-raw")
    step_format: str  # what the denoising loop holds between steps (the x_t `--stop-at` captures)
    preset: str  # the PiD preset that decodes its latents
    size: tuple[int, int]  # (H, W)
    steps: int
    guidance: float
    extra: tuple = ()  # (name, value) keyword arguments of the call
    cfg_arg: str = "guidance_scale"  # the call argument --cfg-scale sets (Qwen-Image: its true CFG)
    params_b: tuple[float, float] = (0.0, 0.0)  # billions of parameters: (transformer, text encoders), roughly
    multiple: int = 16  # the sides it makes: multiples of its VAE's factor 8 x its transformer's patch 2 (a UNet: 1)

    def defaults(self) -> dict:
        """The model's own settings as GenerateOptions defaults (what `resolved` fills unset fields from), and the
        multiple its sides must be."""
        return {
            "steps": self.steps,
            "cfg_scale": self.guidance,
            "size": list(self.size),
            "multiple": self.multiple,
            "name": self.name,
        }

    @property
    def family(self) -> str:
        """The VAE family of its latents (what the PiD preset must decode)."""
        return "flux2" if self.latent_format == "flux2-raw" else self.latent_format

    def memory_bytes(self, offload: bool = False) -> int:
        """What it holds on its GPU in bf16 (all its models; with offload, the largest at a time) plus 4 GiB for the
        activations of a 1024² image and its VAE."""
        held = max(self.params_b) if offload else sum(self.params_b)
        return int(held * 1e9 * 2) + (4 << 30)

    def gpu_share(self, offload: bool = False) -> float:
        """Its share of one GPU on a cluster: a whole card for a generator of over 10B parameters (a 12B transformer
        does not share a card with PiD), half of one for the smaller ones and for an offloaded one."""
        return 1.0 if not offload and sum(self.params_b) > 10 else 0.5

    def describe(self) -> str:
        h, w = self.size
        return f"{w}x{h}, {self.steps} steps, cfg {self.guidance:g}, -> {self.preset}"


_MSL = (("max_sequence_length", 512),)
_1K = (1024, 1024)
_FLUX2 = ("Flux2KleinPipeline", "flux2-raw", "flux2-packed", "flux2-2kto4k-v1.5", _1K, 4, 1.0, _MSL)
_QWEN = ("QwenImagePipeline", "qwenimage-packed", "qwenimage-packed", "qwenimage-2kto4k-v1.5", _1K, 50, 4.0,
         (*_MSL, ("negative_prompt", " ")), "true_cfg_scale")  # fmt: skip
_ZIMAGE = ("ZImagePipeline", "zimage", "zimage", "flux-2kto4k-v1.5", _1K)
GENERATORS: dict[str, Generator] = {g.name: g for g in [
    Generator("flux", "FluxPipeline", "black-forest-labs/FLUX.1-dev", "flux-packed", "flux-packed",
              "flux-2kto4k-v1.5", _1K, 28, 3.5, _MSL, params_b=(12, 4.9)),
    Generator("flux2", "Flux2Pipeline", "black-forest-labs/FLUX.2-dev", "flux2-packed", "flux2-packed",
              "flux2-2kto4k-v1.5", _1K, 50, 4.0, _MSL, params_b=(32, 24)),
    Generator("flux2-klein-4b", _FLUX2[0], "black-forest-labs/FLUX.2-klein-4B", *_FLUX2[1:], params_b=(4, 4)),
    Generator("flux2-klein-9b", _FLUX2[0], "black-forest-labs/FLUX.2-klein-9B", *_FLUX2[1:], params_b=(9, 8)),
    Generator("qwenimage", _QWEN[0], "Qwen/Qwen-Image", *_QWEN[1:], params_b=(20, 8.3)),
    Generator("qwenimage-2512", _QWEN[0], "Qwen/Qwen-Image-2512", *_QWEN[1:], params_b=(20, 8.3)),
    Generator("zimage", *_ZIMAGE[:1], "Tongyi-MAI/Z-Image", *_ZIMAGE[1:], 50, 5.0, _MSL, params_b=(6, 4)),
    Generator("zimage-turbo", *_ZIMAGE[:1], "Tongyi-MAI/Z-Image-Turbo", *_ZIMAGE[1:], 9, 0.0, _MSL, params_b=(6, 4)),
    Generator("sd3", "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", "sd3",
              "sd3-2kto4k", _1K, 28, 4.0, params_b=(2, 5.6)),
    Generator("sdxl", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "sdxl",
              "sdxl-2kto4k", _1K, 30, 7.5, params_b=(2.6, 0.8), multiple=8),
]}  # fmt: skip
CLASSES = sorted({g.pipeline for g in GENERATORS.values()})
MAX_INDEX_BYTES = 1 << 20  # a model_index.json


def _shown(text: str) -> str:
    """A name or path as a message shows it: at most 200 characters, quoted when it holds what a line cannot."""
    text = str(text)
    return text if len(text) <= 200 and text.isprintable() else repr(text[:200]) + ("..." if len(text) > 200 else "")


def unknown_generator(name: str) -> str:
    """One line for a name that is no generator (and no folder): the nearest name, the known ones."""
    import difflib

    near = difflib.get_close_matches(str(name)[:200], list(GENERATORS), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return (f"--with {str(name)[:200]!r}: not a generator{hint} and not a diffusers folder (no model_index.json); "
            f"known: {', '.join(GENERATORS)}")  # fmt: skip


def generator_spec(name_or_dir: str) -> tuple[Generator, str]:
    """(the generator's settings, where to load it from): a registry name (its hub id) or a local folder laid out like
    a diffusers repository, its class read from model_index.json and checked (with the components it names) before
    anything loads; the folder takes the settings of the first name of its class, or of NAME with `NAME=DIR` (a
    folder of Z-Image-Turbo: `zimage-turbo=DIR`, which runs 9 steps without guidance, not Z-Image's 50 guided). DIR
    is a folder, whatever it holds ('=' included); anything else is a SetupError in one line."""
    if name_or_dir in GENERATORS:
        g = GENERATORS[name_or_dir]
        return g, g.hub_id
    text = str(name_or_dir)
    named, eq, folder = text.partition("=")
    if eq and named in GENERATORS:  # NAME=DIR: the folder holds that one (zimage-turbo, klein-9b, ...)
        if not folder.strip() or folder in GENERATORS:
            raise SetupError(
                f"--with {_shown(text)}: NAME=DIR needs a folder after '='"
                + (f", not a generator's name (--with {folder})" if folder in GENERATORS else "")
            )
        g, where = _folder_spec(folder, f"--with {_shown(text)}")
        if g.pipeline != GENERATORS[named].pipeline:
            raise SetupError(f"--with {_shown(text)}: the folder holds a {g.pipeline}, not {named}'s "
                             f"{GENERATORS[named].pipeline}")  # fmt: skip
        return GENERATORS[named], where
    if eq and not named and not _is_dir(text):
        raise SetupError(f"--with {_shown(text)}: NAME=DIR needs a generator name before '=' "
                         f"({', '.join(GENERATORS)})")  # fmt: skip
    return _folder_spec(text, f"--with {_shown(text)}")


def _is_dir(text: str) -> bool:
    try:
        return Path(text).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL, ~user without a home
        return False


def _folder_spec(text: str, what: str) -> tuple[Generator, str]:
    """A diffusers folder's generator: its model_index.json (a regular file of at most MAX_INDEX_BYTES, read once
    and bounded) names a class pidray runs and components the folder holds."""
    import stat

    try:
        path = Path(text).expanduser()
        if not path.is_dir():
            if path.is_file():
                raise SetupError(f"{what}: a file, not a diffusers folder (give the folder of its model_index.json)")
            raise SetupError(unknown_generator(text))
        mode = (path / "model_index.json").stat().st_mode  # through a link: what it points at
    except (OSError, ValueError, RuntimeError):  # none there, a name too long, a NUL, ~user without a home
        raise SetupError(unknown_generator(text)) from None
    if not stat.S_ISREG(mode):
        raise SetupError(f"{what}: its model_index.json is not a regular file (a FIFO, a device or a folder)")
    meta = _read_index(path / "model_index.json", what)
    cls = meta.get("_class_name")
    if not isinstance(cls, str) or cls not in CLASSES:
        raise SetupError(f"{what}: its model_index.json names {str(cls)[:80]!r}, not a generator pidray runs "
                         f"({', '.join(CLASSES)})")  # fmt: skip
    for comp, spec in meta.items():  # each component it names must be a folder of the repository
        if comp.startswith("_") or not isinstance(spec, list) or spec[:1] == [None] or spec == [None, None]:
            continue
        try:
            held = (path / comp).is_dir()
        except (OSError, ValueError):  # a name too long, a NUL
            held = False
        if not held:
            raise SetupError(f"{what}: model_index.json names a component {comp[:60]!r} "
                             f"({str(spec[-1] if spec else spec)[:60]!r}) that the folder does not hold")  # fmt: skip
    base = next(g for g in GENERATORS.values() if g.pipeline == cls)
    return base, str(path)


def _read_index(index: Path, what: str) -> dict:
    """model_index.json as a JSON object, read without blocking (a FIFO swapped in) and at most MAX_INDEX_BYTES + 1
    bytes of it (a file that says it is empty, as /proc's do, may hold more)."""
    import os
    import stat

    try:
        fd = os.open(index, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            data = f.read(MAX_INDEX_BYTES + 1)
        if len(data) > MAX_INDEX_BYTES:
            raise ValueError(f"over {MAX_INDEX_BYTES:,} bytes")
        meta = json.loads(data.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise SetupError(f"{what}: model_index.json is not readable (JSON nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SetupError(f"{what}: model_index.json is not readable ({str(e)[:120]})") from None
    return meta


def generators_help() -> str:
    """The names and their defaults, for `pidray generate --help`."""
    return "; ".join(f"{n} ({g.describe()})" for n, g in GENERATORS.items())


__all__ = ["CLASSES", "GENERATORS", "Generator", "generator_spec", "generators_help", "unknown_generator"]
