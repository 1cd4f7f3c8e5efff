"""The workflows: what a job or a request runs, resolved once where it enters into one frozen, typed object.

    upscale    image files -> decode -> encode (LQ encoder, captioner) -> diffuse -> merge
    decode     latent files (latents, captured x_t) -> latent -> encode (plan, caption) -> diffuse -> merge
    generate   prompts -> generate (PixelDiT) -> merge; with an upscale model: -> encode -> diffuse -> merge
    ldm        prompts -> a generator's latent (pipeline.generators) -> encode (plan, caption) -> diffuse -> merge

`resolve_workflow` is the one place a workflow name is read and, for a front end, the one place its preset is looked
up: the CLI job, the endpoint's builder and the Python API call it once. A workflow holds the `Preset` object, the
options, the latent format and the generator's settings, and owns what differs between workflows: its stages (the
`StageSpec`s every driver iterates), what its rows enter as (`enters`), and the models whose weights its preflight
checks (`models`). Adding a workflow is a class here and its entry in `WORKFLOWS`; no driver changes.

`Workflow.enter` is the one way a row comes in, in every driver (the local loop, Ray Data, the endpoint, the Python
API): it resolves the row's options once (`pipeline.options.Resolved`: its overrides over the workflow's, every value
the PiD preset decides filled in and checked), and the stages read them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

from pipeline.memory import tile_bytes, weight_bytes
from pipeline.model.presets import Preset, get_preset
from pipeline.options import Resolved
from pipeline.runtime import ModelOptions, encode_bytes
from pipeline.spec import Footprint, StageSpec
from pipeline.stages import DecodeStage, DiffuseStage, EncodeStage, MergeStage, ReadStage, WriteStage
from pipeline.stages.common import UpscaleOptions
from pipeline.stages.latent import LatentStage
from pipeline.t2i import GenerateOptions

DEFAULT_WORKFLOW = "upscale"
DEFAULT_LDM = "zimage-turbo"  # generate-then-decode's latent diffusion model when none is named


# ------------------------------------------------------------------------------------ each stage's memory need
def _decode_bytes(f: Footprint) -> int:
    return f.in_hw[0] * f.in_hw[1] * 3 * 2


def _encode_bytes(f: Footprint) -> int:
    return encode_bytes(f.preset, f.plan.pad_hw, f.device)


def _diffuse_bytes(f: Footprint) -> int:
    cfg, plan = f.preset.config, f.plan
    tiles = plan.n_tiles * 3 * 4 * plan.tile_out[0] * plan.tile_out[1] * 4
    canvas = plan.canvas_hw[0] * plan.canvas_hw[1] * 3 * 4 * 2
    return weight_bytes(cfg, f.dtype) + tile_bytes(cfg, plan.tile_out, f.dtype) + tiles + canvas


def _merge_bytes(f: Footprint) -> int:
    return f.plan.out_hw[0] * f.plan.out_hw[1] * 3 * 2 * 2


def pid_stages(model: ModelOptions, preset: Preset, options: Resolved, holds_encode: bool, encode_share: float,
               diffuse_share: float, lq: bool = True) -> list[StageSpec]:  # fmt: skip
    """PiD's stages, the same in every workflow: encode (the LQ encoder and the captioner; `lq=False`: the rows
    bring their latent, only the plan and caption are made), diffuse, merge — with their shares of a GPU. `options`:
    the workflow's, resolved (the job-wide settings those stages read; each row brings its own)."""
    encode_kw = {"model": model, "preset": preset, "options": options, "gpu_share": encode_share or 1.0, "lq": lq}
    diffuse_kw = {"model": model, "preset": preset, "options": options, "gpu_share": diffuse_share}
    return [
        StageSpec("encode", EncodeStage, encode_kw, holds_encode, holds_encode, batch_rows=8, gpu_share=encode_share,
                  memory=_encode_bytes if lq else None),
        StageSpec("diffuse", DiffuseStage, diffuse_kw, True, True, batch_rows=16, gpu_share=diffuse_share,
                  memory=_diffuse_bytes, records_node=True, serve_ongoing=16, serve_cpus=0.5),
        StageSpec("merge", MergeStage, {}, False, False, memory=_merge_bytes),
    ]  # fmt: skip


def io_stages(src, dst) -> tuple[list[StageSpec], StageSpec]:
    """The bulk job's read stage (none when `src` is None: prompts enter as rows) and its write stage."""
    read = [StageSpec("read", ReadStage, {"src": src}, False, False)] if src is not None else []
    return read, StageSpec("write", WriteStage, {"dst": dst}, False, False)


# ------------------------------------------------------------------------------------ the workflows
@dataclass(frozen=True)
class Workflow:
    """A workflow resolved: the model (options and `Preset` object) and the options every row starts from."""

    model: ModelOptions
    preset: Preset
    options: UpscaleOptions
    enters: ClassVar[str] = "images"  # what its rows are, in words: "images" / "latents" (files), "prompts" (lines)
    reads_images: ClassVar[bool] = True  # its rows are image files (their headers probed, one output each)
    reads_latents: ClassVar[bool] = False  # its rows are latent files (a batch file is one row per latent)
    takes_prompts: ClassVar[bool] = False  # its rows are the lines of one prompt file

    @property
    def reads_files(self) -> bool:
        """Its rows are files read from SRC (prompts enter as rows: nothing to read)."""
        return not self.takes_prompts

    def stages(self) -> list[StageSpec]:
        raise NotImplementedError

    @property
    def samples_with(self) -> Preset | None:
        """The PiD preset whose sampler the options are resolved against (None: no PiD stage runs)."""
        return self.preset

    @cached_property
    def resolved(self) -> Resolved:
        """The workflow's own options resolved against its PiD preset (`Resolved`): what a row that sets nothing
        enters with, and the job-wide settings its stages read. BadParameter for what the preset cannot do."""
        return Resolved.of(self.options, self.samples_with)

    def enter(self, row: dict) -> dict:
        """A row as it enters, the one way a row comes in (every driver calls it): `opts`, its options resolved once
        (`Resolved`: the row's overrides over the workflow's options, everything the preset decides filled in and
        checked); kept when the row has entered already. BadParameter for an override or a value the preset cannot
        take."""
        if isinstance(row.get("opts"), Resolved):
            return row
        options = self.options.overridden(row)
        opts = self.resolved if options is self.options else Resolved.of(options, self.samples_with)
        return {**row, "opts": opts}

    def models(self) -> list[tuple[ModelOptions, Preset]]:
        """The models whose weights this workflow loads (what its preflight looks for)."""
        return [(self.model, self.preset)]

    @property
    def generator(self) -> str | None:
        """The generator (name or folder) whose latents this workflow hands PiD; None for the others."""
        return None


@dataclass(frozen=True)
class Upscale(Workflow):
    def stages(self) -> list[StageSpec]:
        vae = not self.preset.family.pixels  # an encoder model to place
        share = 0.25 if vae else 0.0  # on a GPU cluster the shares of one GPU add up to 1
        decode = StageSpec("decode", DecodeStage, {"max_pixels": self.options.max_pixels}, False, False,
                           memory=_decode_bytes)  # fmt: skip
        return [decode, *pid_stages(self.model, self.preset, self.resolved, vae, share, 1.0 - share)]


@dataclass(frozen=True)
class Decode(Workflow):
    """No VAE: the latent stage reads the latent, the encode stage only plans and embeds the caption."""

    latent_format: str | None = None  # what the files hold; None: the preset's (or the file's own)
    enters: ClassVar[str] = "latents"
    reads_images: ClassVar[bool] = False
    reads_latents: ClassVar[bool] = True

    def stages(self) -> list[StageSpec]:
        captioned = self.preset.captioned
        share = 0.1 if captioned else 0.0
        kw = {"preset": self.preset, "latent_format": self.latent_format}
        latent = StageSpec("latent", LatentStage, kw, False, False)
        return [latent, *pid_stages(self.model, self.preset, self.resolved, captioned, share, 1.0 - share, lq=False)]


@dataclass(frozen=True)
class Generate(Workflow):
    """PixelDiT (`model` is the text-to-image preset, `gen` its settings), then, with `upscale`, that PiD model's
    encode and diffuse stages on the generated image."""

    gen: GenerateOptions = field(default_factory=GenerateOptions)
    upscale: ModelOptions | None = None
    upscale_preset: Preset | None = None
    emit: str | None = None  # what the generate stage hands on; None: the image to upscale, else the pixels to write
    enters: ClassVar[str] = "prompts"
    reads_images: ClassVar[bool] = False
    takes_prompts: ClassVar[bool] = True

    @property
    def samples_with(self) -> Preset | None:
        return self.upscale_preset  # PixelDiT's image is written as it is unless a PiD preset upscales it

    def generate_stage(self, gpu_share: float) -> StageSpec:
        emit = self.emit or ("image" if self.upscale else "pixels")
        kw = {"model": self.model, "preset": self.preset, "options": self.gen, "emit": emit}
        return StageSpec("generate", _generate_cls(), kw, True, True, batch_rows=4, gpu_share=gpu_share)

    def stages(self) -> list[StageSpec]:
        if self.upscale is None:
            return [self.generate_stage(1.0), StageSpec("merge", MergeStage, {}, False, False)]
        vae = not self.upscale_preset.family.pixels
        pid = pid_stages(self.upscale, self.upscale_preset, self.resolved, vae, 0.1 if vae else 0.0, 0.4)
        return [self.generate_stage(0.5), *pid]

    def models(self) -> list[tuple[ModelOptions, Preset]]:
        return [(self.model, self.preset)] + ([(self.upscale, self.upscale_preset)] if self.upscale else [])


@dataclass(frozen=True)
class Ldm(Workflow):
    """Prompts -> a latent diffusion model's latent (`ldm`: its name or folder) -> PiD (`model`) decodes it instead
    of the model's VAE."""

    gen: GenerateOptions = field(default_factory=GenerateOptions)
    ldm: str = DEFAULT_LDM
    offload: bool = False  # the generator's models wait in CPU memory, each on the GPU while it runs
    enters: ClassVar[str] = "prompts"
    reads_images: ClassVar[bool] = False
    takes_prompts: ClassVar[bool] = True

    @property
    def generator(self) -> str | None:
        return self.ldm

    def stages(self) -> list[StageSpec]:
        from pipeline.generators import generator_spec
        from pipeline.stages.ldm import LDMStage

        captioned = self.preset.captioned
        kw = {"model": self.model, "preset": self.preset, "ldm": self.ldm, "options": self.gen,
              "offload": self.offload}  # fmt: skip
        spec = generator_spec(self.ldm)[0]
        need = spec.memory_bytes(self.offload)
        ldm = StageSpec("ldm", LDMStage, kw, True, True, batch_rows=1, gpu_share=spec.gpu_share(self.offload),
                        memory=lambda f: need)  # fmt: skip
        return [ldm, *pid_stages(self.model, self.preset, self.resolved, captioned, 0.1 if captioned else 0.0, 0.4,
                                 lq=False)]  # fmt: skip


def _generate_cls():
    from pipeline.stages.generate import GenerateStage

    return GenerateStage


WORKFLOWS: dict[str, type[Workflow]] = {"upscale": Upscale, "decode": Decode, "generate": Generate, "ldm": Ldm}


def workflow_class(name: str) -> type[Workflow]:
    """The class of a workflow name (its `enters` and the like are class attributes); ValueError for others."""
    cls = WORKFLOWS.get(name)
    if cls is None:
        raise ValueError(f"workflow must be one of {tuple(WORKFLOWS)}, got {name!r}")
    return cls


def resolve_workflow(name: str = DEFAULT_WORKFLOW, model: ModelOptions | None = None,
                     options: UpscaleOptions | None = None, *, latent_format: str | None = None, gen=None,
                     upscale: ModelOptions | None = None, ldm: str | None = None, emit: str | None = None,
                     preset: Preset | None = None, upscale_preset: Preset | None = None,
                     offload: bool = False) -> Workflow:  # fmt: skip
    """The workflow `name` resolved once: its model's preset looked up (unless given: `preset`, `upscale_preset`,
    already resolved for another workflow of the same front end), the generator's settings typed. Front ends call
    this where a job or request enters; everything downstream takes the object."""
    cls = workflow_class(name)
    model = model or ModelOptions()
    options = options or UpscaleOptions()
    preset = preset or get_preset(model.preset)
    gen = gen if isinstance(gen, GenerateOptions) else GenerateOptions.from_dict(gen or {})
    if cls is Decode:
        return Decode(model, preset, options, latent_format=latent_format)
    if cls is Ldm:
        return Ldm(model, preset, options, gen=gen, ldm=ldm or DEFAULT_LDM, offload=offload)
    if cls is Generate:
        up = (upscale_preset or get_preset(upscale.preset)) if upscale is not None else None
        if up is not None and not up.upscales:
            raise ValueError(f"--upscale takes a PiD preset, not {up.name!r}")
        return Generate(model, preset, options, gen=gen, upscale=upscale, upscale_preset=up, emit=emit)
    return cls(model, preset, options)
