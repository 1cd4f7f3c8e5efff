"""LDMStage: a prompt -> a text-to-image generator's latent (diffusers, `output_type="latent"`), which PiD then decodes
in place of the generator's VAE decoder: generate-then-decode (`pidray generate --with NAME`, extra
`pidray[generate]`). The generators and their settings: `pipeline.generators`.

The latent handed on is exactly the [C, h, w] tensor PiD's LQ encoder of that VAE produces: Z-Image, SD3 and SDXL
return it as it is; Flux and Qwen-Image return packed 2×2 patches (unpacked; Qwen-Image's one-frame time axis is not
there to drop); FLUX.2 returns its patchified, batch-norm normalised latent as a token sequence (laid out);
FLUX.2-klein un-normalises that latent (in its own dtype) into the raw 32-channel one it returns, so the latent its
loop held after its last step (the same token sequence, captured by a step-end callback) is handed on instead of a
re-normalised copy of its output (the fallback: patchified and normalised with its VAE's batch-norm statistics).

`stop_at` K: the generator's x_t after K of its N steps (a step-end callback captures it and ends the loop: the last
steps are skipped) goes to PiD with the scheduler's sigma after those K steps, as `pidray decode --sigma` takes a
captured x_t (SDXL's Euler frame moved to the VP frame its PiD student was trained in).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from pipeline.errors import BadInput, SetupError
from pipeline.generators import Generator, generator_spec
from pipeline.latents import Packing, check_format, flux2_normalised, is_packed, to_training_frame, unpack
from pipeline.model.presets import Preset
from pipeline.runtime import ModelOptions, pick_device
from pipeline.stages.common import entered
from pipeline.stages.latent import latent_source
from pipeline.t2i import GenerateOptions, check_prompt, row_options

ldm_spec = generator_spec  # the name the job's preflight and prompt planner use


class StopAt:
    """A step-end callback: after `k` steps it keeps the loop's latents and the scheduler's sigma at that point, and
    (with `interrupt`) asks the pipeline to skip the rest of its loop."""

    def __init__(self, k: int, interrupt: bool = True):
        self.k, self.interrupt, self.latent, self.sigma = k, interrupt, None, None

    def __call__(self, pipe, step_index: int, timestep, kwargs: dict) -> dict:
        if step_index == self.k - 1:
            sigmas = pipe.scheduler.sigmas
            self.sigma = float(sigmas[min(step_index + 1, len(sigmas) - 1)])
            self.latent = kwargs["latents"].detach().to("cpu", torch.float32, copy=True)  # never the loop's tensor
            if self.interrupt:
                pipe._interrupt = True  # every pipeline's loop skips its remaining steps when interrupted
        return kwargs


def to_pid_latent(latent: torch.Tensor, fmt: str, hw: tuple[int, int], pipe=None) -> np.ndarray:
    """A generator's latent (its first image) as the [C, h, w] PiD's LQ encoder produces. `fmt`: what it is (a
    latent format, or "flux2-raw": FLUX.2-klein's output, normalised with `pipe`'s VAE statistics)."""
    a = latent[0].detach().float().cpu().numpy()
    if fmt == "flux2-raw":
        bn = pipe.vae.bn
        eps = float(getattr(pipe.vae.config, "batch_norm_eps", bn.eps))
        return flux2_normalised(a, bn.running_mean.float().cpu().numpy(), bn.running_var.float().cpu().numpy(), eps)
    if is_packed(fmt):
        return unpack(a, Packing(fmt, image_hw=hw))
    if a.ndim != 3:
        raise BadInput(f"the generator gave a latent of shape {list(latent.shape)}, not [B, C, h, w]")
    return np.ascontiguousarray(a)


def generator_latent(pipe, spec: Generator, hw: tuple[int, int], steps: int, stop_at: int | None = None,
                     **call) -> tuple[np.ndarray, float | None]:  # fmt: skip
    """Run the generator (`call`: the prompt or its embeddings, guidance, seed, ...) and return (PiD's latent, None),
    or with `stop_at` K < steps (x_t after K steps, the scheduler's sigma there)."""
    stop = StopAt(stop_at) if stop_at is not None and stop_at < steps else None
    last = stop is None and spec.latent_format == "flux2-raw"  # klein returns it un-normalised: keep the loop's own
    if last:
        stop = StopAt(steps, interrupt=False)
    if stop is not None:
        call["callback_on_step_end"] = stop
    with torch.inference_mode():
        out = pipe(height=hw[0], width=hw[1], num_inference_steps=steps, output_type="latent", **call)
    if stop is None or (last and stop.latent is None):
        return to_pid_latent(out.images, spec.latent_format, hw, pipe), None
    if stop.latent is None:
        raise BadInput(f"{spec.pipeline} did not reach step {stop_at} of {steps}")
    return to_pid_latent(stop.latent, spec.step_format, hw, pipe), None if last else stop.sigma


class LDMStage:
    def __init__(
        self,
        model: ModelOptions,
        preset: Preset,  # the PiD preset that decodes the latent, resolved where the job entered
        ldm: str,
        options: GenerateOptions | None = None,
        offload: bool = False,  # the generator's models wait in CPU memory, each moved to the GPU while it runs
    ):
        try:
            import diffusers
        except ImportError:
            raise SetupError("generate-then-decode needs diffusers: pip install 'pidray[generate]'") from None
        self.model = model
        self.options = options or GenerateOptions()
        self.preset = preset
        self.spec, where = generator_spec(ldm)  # a folder's class checked before anything loads
        check_format(self.spec.family, self.preset)  # the PiD preset decodes this model's latents
        self.device = pick_device(self.model.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        _quiet(diffusers)
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
        if offload and self.device.type == "cuda":
            self.pipe.enable_model_cpu_offload(device=self.device)
        else:
            self.pipe.to(self.device)

    def process(self, row: dict) -> dict:
        row = dict(row)
        prompt = check_prompt(row.get("prompt"))
        o = row_options(self.options, row).resolved(self.preset, self.spec.defaults())
        kw = dict(self.spec.extra)
        kw[self.spec.cfg_arg] = o.cfg_scale
        if o.negative_prompt and o.cfg_scale > 1:
            kw["negative_prompt"] = o.negative_prompt
        gen = torch.Generator("cpu" if self.device.type != "cuda" else self.device).manual_seed(o.seed)
        latent, sigma = generator_latent(self.pipe, self.spec, o.size, o.steps, o.stop_at, prompt=prompt,
                                         generator=gen, **kw)  # fmt: skip
        o_up = entered(row)
        over = {} if o_up.caption else {"caption": prompt}  # PiD's caption: the prompt
        if sigma is not None:  # a captured x_t, conditioned at its own sigma with no further noise
            latent, vp_sigma = to_training_frame(latent, sigma, self.preset)
            over["degrade_sigma"] = vp_sigma
            row["noised"] = True
            row["sigma"] = sigma
            row["notes"] = [*row.get("notes", []), f"x_t after step {o.stop_at} of {o.steps}, sigma {sigma:.6g}"]
        row["latent"] = np.ascontiguousarray(latent, dtype=np.float32)
        row["src"] = latent_source()
        row["opts"] = replace(o_up, **over) if over else o_up
        row["caption"] = row["opts"].caption
        row["seed"] = o.seed
        return row


def _quiet(diffusers) -> None:
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
