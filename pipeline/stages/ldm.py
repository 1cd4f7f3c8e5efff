"""LDMStage: a prompt -> a latent diffusion model's latent (diffusers, `output_type="latent"`), which PiD then decodes
in place of the model's VAE decoder: generate-then-decode (`pidray generate --with zimage-turbo`, extra
`pidray[generate]`).

Supported are the pipelines whose latent output is already the [B, C, h, w] latent in the space PiD's LQ encoders
produce (the generator un-normalises only right before its VAE decode): Z-Image / Z-Image-Turbo (Flux's VAE: the
`zimage` format of the Flux presets), SD3 and SDXL. Packed-sequence outputs (Flux, Flux2, Qwen-Image) are not run
here; their latents, unpacked, go through `pidray decode`. Defaults per model are the official from_ldm registry's
(nv-tlabs/PiD `pipeline_registry.py`): resolution, steps, guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import BadInput, SetupError
from pipeline.latents import check_format
from pipeline.model.presets import Preset
from pipeline.runtime import ModelOptions, pick_device
from pipeline.stages.common import UpscaleOptions, options_of
from pipeline.stages.latent import latent_source
from pipeline.t2i import GenerateOptions, check_prompt, row_options


@dataclass(frozen=True)
class LDM:
    pipeline: str  # the diffusers class
    hub_id: str
    latent_format: str  # pipeline.latents.FORMATS
    size: tuple[int, int]
    steps: int
    guidance: float
    extra: tuple = ()  # (name, value) keyword arguments of the call

    def defaults(self) -> dict:
        """The model's own settings as GenerateOptions defaults (what `resolved` fills unset fields from)."""
        return {"steps": self.steps, "cfg_scale": self.guidance, "size": list(self.size)}


LDMS = {
    "zimage-turbo": LDM("ZImagePipeline", "Tongyi-MAI/Z-Image-Turbo", "zimage", (1024, 1024), 9, 0.0,
                        (("max_sequence_length", 512),)),
    "zimage": LDM("ZImagePipeline", "Tongyi-MAI/Z-Image", "zimage", (1024, 1024), 50, 5.0,
                  (("max_sequence_length", 512),)),
    "sd3": LDM("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", (1024, 1024), 28,
               4.0),
    "sdxl": LDM("StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", (1024, 1024), 30,
                7.5),
}  # fmt: skip
BY_CLASS = {"ZImagePipeline": "zimage", "StableDiffusion3Pipeline": "sd3", "StableDiffusionXLPipeline": "sdxl"}


def ldm_spec(name_or_dir: str) -> tuple[LDM, str]:
    """(the model's settings, where to load it from): a registry name (its hub id) or a local folder laid out like a
    diffusers repository (its class read from model_index.json)."""
    if name_or_dir in LDMS:
        spec = LDMS[name_or_dir]
        return spec, spec.hub_id
    path = Path(name_or_dir).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        raise SetupError(f"--with {name_or_dir!r}: not one of {', '.join(LDMS)} and not a diffusers folder "
                         "(no model_index.json)")  # fmt: skip
    cls = json.loads(index.read_text()).get("_class_name")
    if cls not in BY_CLASS:
        raise SetupError(f"--with {name_or_dir}: {cls} is not supported here (supported: {', '.join(BY_CLASS)}; "
                         "decode other models' latents with pidray decode)")  # fmt: skip
    base = next(s for s in LDMS.values() if s.pipeline == cls)
    return base, str(path)


class LDMStage:
    def __init__(
        self,
        model: ModelOptions,
        preset: Preset,  # the PiD preset that decodes the latent, resolved where the job entered
        ldm: str,
        options: GenerateOptions | None = None,
        upscale: UpscaleOptions | None = None,
    ):
        try:
            import diffusers
        except ImportError:
            raise SetupError("generate-then-decode needs diffusers: pip install 'pidray[generate]'") from None
        self.model = model
        self.options = options or GenerateOptions()
        self.upscale = upscale or UpscaleOptions()
        self.preset = preset
        self.spec, where = ldm_spec(ldm)
        check_format(self.spec.latent_format, self.preset)  # the PiD preset decodes this model's latents
        self.device = pick_device(self.model.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
        try:
            self.pipe = diffusers.DiffusionPipeline.from_pretrained(
                where, local_files_only=not self.model.allow_download, use_safetensors=True, dtype=dtype
            )
        except OSError as e:
            raise SetupError(
                f"--with {ldm}: cannot load {where} ({e}); download it with `hf download {where} "
                "--local-dir DIR` and pass --with DIR, or --allow-download"
            ) from None
        if type(self.pipe).__name__ != self.spec.pipeline:
            raise SetupError(f"{where} holds a {type(self.pipe).__name__}, expected {self.spec.pipeline}")
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)

    def process(self, row: dict) -> dict:
        row = dict(row)
        prompt = check_prompt(row.get("prompt"))
        o = row_options(self.options, row).resolved(self.preset, self.spec.defaults())
        h, w = o.size
        kw = dict(self.spec.extra)
        if o.negative_prompt and o.cfg_scale > 1:
            kw["negative_prompt"] = o.negative_prompt
        with torch.inference_mode():
            out = self.pipe(
                prompt,
                height=h,
                width=w,
                num_inference_steps=o.steps,
                guidance_scale=o.cfg_scale,
                output_type="latent",
                generator=torch.Generator(self.device).manual_seed(o.seed),
                **kw,
            )
        latent = out.images[0]
        if latent.ndim != 3:
            raise BadInput(f"{self.spec.pipeline} gave a latent of shape {list(out.images.shape)}, not [B, C, h, w]")
        row["latent"] = np.ascontiguousarray(latent.float().cpu().numpy())
        row["src"] = latent_source()
        o_up = options_of(row, self.upscale)
        row["opts"] = replace(o_up, caption=prompt) if not o_up.caption else o_up  # PiD's caption: the prompt
        row["caption"] = row["opts"].caption
        row["seed"] = o.seed
        return row
