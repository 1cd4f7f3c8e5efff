"""The endpoint's builder: `AppArgs` (the typed arguments of serve/config.yaml and `pidray serve`) -> the Serve app.

The workflows each route runs are resolved here, once: their presets looked up, the options parsed. Every
model-holding stage of them becomes one deployment (`StageDeployment`, named after the stage; stages that several
workflows share are one deployment), with its resources from its spec; the ingress gets the handles and the
workflows. When the stages of all routes ask for more than one GPU together, each one's share is scaled down so they
fit one. No stage is named here: adding a stage to a workflow adds its deployment.
"""

# No `from __future__ import annotations`: pydantic reads the annotations of AppArgs.

import dataclasses
import os

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.graph import StageGraph
from pipeline.runtime import ModelOptions
from pipeline.spec import StageSpec, hidden_gpu_env
from pipeline.stages import UpscaleOptions
from pipeline.t2i import GenerateOptions
from pipeline.workflow import resolve_workflow
from serve.deployments import (
    DeploymentArgs,
    StageDeployment,
    check_batch_settings,
    check_drain,
    deployment_options,
    stage_default,
)
from serve.routes import Chains, Ingress

# The endpoint's numeric settings and their ranges (lowest, highest; an int range for an integer setting), checked
# when the app is built: a value outside (NaN and infinities included) is refused with the setting's name and its
# range, never left to fail every request (no decode slots: all time out) or to switch a limit off (a NaN cost).
SETTING_RANGES = {
    "threads": (0, 1024),  # 0: the machine's cores
    "max_bytes": (1 << 10, 2 << 30),
    "timeout_s": (1.0, 3600.0),
    "body_timeout_s": (1.0, 600.0),
    "body_grace_s": (0.5, 120.0),
    "body_min_bytes_per_s": (1, 1 << 30),
    "max_cost_mpx_steps": (0.01, 1e6),  # unset: the device's default
    "max_in_flight": (1, 4096),
    "max_uploads": (1, 4096),
    "max_uploads_per_client": (1, 4096),
    "decode_concurrency": (1, 256),
}
OUTPUT_S3_KEYS = ("uri", "s3")


def check_output_s3(value: dict) -> dict:
    """output_s3: {"uri": "s3://bucket/prefix", "s3": {S3Settings fields}}, nothing else; ValueError saying what."""
    from pipeline.errors import SetupError
    from pipeline.storage import Location, S3Settings

    unknown = sorted(set(value) - set(OUTPUT_S3_KEYS))
    if unknown:
        raise ValueError(f"output_s3 takes {list(OUTPUT_S3_KEYS)}, not {unknown}")
    uri = value.get("uri")
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"output_s3.uri must be an s3://bucket/prefix URI, got {str(uri)[:80]!r}")
    try:
        Location(uri).bucket_prefix
        S3Settings(**(value.get("s3") or {}))
    except (SetupError, TypeError) as e:  # a bad bucket name, an unknown S3 setting or one not given as fields
        raise ValueError(f"output_s3: {str(e)[:300]}") from None
    return value


class AppArgs(BaseModel):
    """The endpoint's arguments (`serve/config.yaml` args, `pidray serve`), typed and validated once."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "small"
    weights: str | None = None
    text_encoder: str | None = None
    allow_download: bool = False
    device: str = "auto"
    dtype: str = "auto"
    kernels: str | None = None  # "auto" | "torch" | "triton"
    options: dict = Field(default_factory=dict)  # UpscaleOptions defaults for every request
    deployments: dict[str, DeploymentArgs] = Field(default_factory=dict)  # per deployment: its Serve options
    gpu: bool | None = None  # None: whether the cluster has GPUs
    max_batch_tiles: int = 16
    batch_wait_s: float = 0.0  # a request never waits for company: those that arrive while a batch runs form the next
    threads: int = 0  # torch threads per CPU replica (0: the machine's cores)
    max_bytes: int = 50 << 20
    timeout_s: float = 120.0
    body_timeout_s: float = 30.0
    # a body still arriving must keep up body_min_bytes_per_s once body_grace_s have passed (408 otherwise)
    body_grace_s: float = 5.0
    body_min_bytes_per_s: int = 16 << 10
    max_cost_mpx_steps: float | None = None  # None: 1000 with a GPU, 8 on CPUs
    max_in_flight: int = 16  # work slots: requests whose body is in
    max_uploads: int = 32  # bodies still arriving, in all and from one client address: never a work slot
    max_uploads_per_client: int = 8
    decode_concurrency: int = 2
    token: str | None = None
    require_token: bool = False
    output_s3: dict | None = None  # {"uri": "s3://bucket/prefix", "s3": {S3Settings fields}}
    allowed_origins: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    bind_host: str = ""
    # /v1/generate: a text-to-image preset served beside the PiD one, e.g. {"preset": "pixeldit-2k", "weights": DIR,
    # "text_encoder": DIR, "options": {GenerateOptions defaults}}; None: no text-to-image on this endpoint
    generate: dict | None = None

    @field_validator(*SETTING_RANGES, mode="wrap")
    @classmethod
    def _in_range(cls, value, handler, info):
        lo, hi = SETTING_RANGES[info.field_name]
        what = f"an integer in {lo}..{hi}" if isinstance(lo, int) else f"a number in [{lo:g}, {hi:g}]"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            parsed = handler(value)
        except ValidationError:
            if number:  # a number its type refuses (1e20 or 2.5 for an integer): the range says why
                raise ValueError(f"{info.field_name} must be {what}, got {value!r}") from None
            raise
        if parsed is not None and (isinstance(value, bool) or not lo <= parsed <= hi):  # NaN is in no range
            raise ValueError(f"{info.field_name} must be {what}, got {value!r}")
        return parsed

    @field_validator("output_s3")
    @classmethod
    def _output_s3(cls, value):
        return value if value is None else check_output_s3(value)

    @model_validator(mode="after")
    def _drain_covers_the_deadline(self):
        check_drain(self.deployments, self.timeout_s)
        return self

    def generate_with(self) -> str | None:
        """The generator whose latents the served PiD preset decodes (generate={"with": NAME or DIR, ...}), or None."""
        g = self.generate or {}
        if "with" not in g:
            return None
        unknown = sorted(set(g) - {"with", "options", "offload"})
        if unknown or not isinstance(g["with"], str) or not isinstance(g.get("offload", False), bool):
            raise ValueError(f"generate with a generator takes with (a name or a diffusers folder), options and "
                             f"offload (true/false); got {sorted(g)}")  # fmt: skip
        return g["with"]

    def generate_model(self) -> ModelOptions | None:
        if not self.generate or "with" in self.generate:
            return None
        g = self.generate
        unknown = sorted(set(g) - {"preset", "weights", "text_encoder", "options"})
        if unknown or "preset" not in g:
            raise ValueError(
                f"generate needs a preset (text-to-image) or with (a generator whose latents the served "
                f"PiD preset decodes); it takes weights, text_encoder, options; got {sorted(g)}"
            )
        return ModelOptions(g["preset"], g.get("weights"), g.get("text_encoder") or self.text_encoder,
                            self.allow_download, self.device, self.dtype, self.kernels)  # fmt: skip

    def model_options(self) -> ModelOptions:
        return ModelOptions(self.preset, self.weights, self.text_encoder, self.allow_download, self.device, self.dtype,
                            self.kernels)  # fmt: skip


def served_workflows(a: AppArgs) -> Chains:
    """What each route runs, resolved once: the served PiD preset's upscale (and decode, for a preset that decodes
    latents), and with `generate`, the text-to-image preset's generation, alone and followed by the upscale."""
    model, options = a.model_options(), UpscaleOptions.from_dict(a.options)
    up = resolve_workflow("upscale", model, options)
    up.resolved  # the endpoint's options against its preset (steps, guidance, ensemble): refused here, not in a replica
    dec = resolve_workflow("decode", model, options, preset=up.preset) if up.preset.decodes_latents else None
    given = (a.generate or {}).get("options")
    given = {} if given is None else given  # `options:` with nothing under it in YAML
    if not isinstance(given, dict):
        raise ValueError(f"generate.options must be a mapping of generate settings, got {type(given).__name__}")
    gen_opts = GenerateOptions.from_dict(given)
    ldm = a.generate_with()
    if ldm is not None:  # generate-then-decode: the generator's latent, decoded by the served PiD preset
        from pipeline.generators import generator_spec
        from pipeline.latents import check_format

        spec = generator_spec(ldm)[0]  # a name, or a folder whose model_index.json is checked
        check_format(spec.family, up.preset)
        gen_opts.resolved(up.preset, spec.defaults())  # refused here, not in a replica
        offload = bool((a.generate or {}).get("offload", False))
        return Chains(up, dec, resolve_workflow("ldm", model, options, gen=gen_opts, ldm=ldm, preset=up.preset,
                                                offload=offload))  # fmt: skip
    gen_model = a.generate_model()
    if gen_model is None:
        return Chains(up, dec)
    gen = resolve_workflow("generate", gen_model, options, gen=gen_opts, emit="both")  # one deployment, both routes
    if not gen.preset.generates_images:
        raise ValueError(f"generate.preset {gen_model.preset!r} is not a text-to-image preset")
    gen_opts.resolved(gen.preset)  # refused here, not in a replica
    gen_up = None
    if up.preset.upscales:  # then PiD: the upscale from its encode stage on
        gen_up = resolve_workflow("generate", gen_model, options, gen=gen_opts, upscale=model, emit="both",
                                  preset=gen.preset, upscale_preset=up.preset)  # fmt: skip
    return Chains(up, dec, gen, gen_up)


def model_specs(workflows: Chains) -> list[StageSpec]:
    """The deployments: every model-holding stage of the served workflows, once by name (the first workflow's),
    their GPU shares scaled down together when they would ask for more than one GPU."""
    specs: dict[str, StageSpec] = {}
    for w in (getattr(workflows, f.name) for f in dataclasses.fields(workflows)):
        for s in StageGraph(workflow=w).stages if w is not None else ():
            if s.holds_model:
                specs.setdefault(s.name, s)
    total = sum(s.gpu_share for s in specs.values() if s.wants_gpu)
    if total > 1.0:
        specs = {n: dataclasses.replace(s, gpu_share=s.gpu_share / total) for n, s in specs.items()}
    return list(specs.values())


def deployment_names(preset: str) -> list[str]:
    """The deployments `build_app` creates for a preset: the graph's model-holding stages, plus the ingress."""
    up = resolve_workflow("upscale", ModelOptions(preset=preset))
    return ["ingress"] + [s.name for s in StageGraph(workflow=up).model_stages()]


def build_app(args: dict | AppArgs | None = None):
    """Serve application builder (`serve run serve.app:build_app preset=small`): one deployment per model stage."""
    try:
        a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    except ValidationError as e:
        raise ValueError(f"invalid endpoint arguments: {e}") from None
    gpu = _has_gpu() if a.gpu is None else a.gpu
    updates = {"gpu": gpu, "max_cost_mpx_steps": a.max_cost_mpx_steps or (1000.0 if gpu else 8.0),
               "threads": a.threads or (0 if gpu else os.cpu_count() or 1)}  # fmt: skip
    a = a.model_copy(update=updates)
    check_batch_settings({"max_batch_tiles": a.max_batch_tiles, "batch_wait_s": a.batch_wait_s})
    if "ingress" in a.deployments and a.deployments["ingress"].user_config is not None:
        raise ValueError("deployments: user_config (batch settings) applies to the stage deployments, not ingress")
    workflows = served_workflows(a)  # options parsed, presets looked up, here only
    specs = model_specs(workflows)
    unknown = sorted(set(a.deployments) - {"ingress", *(s.name for s in specs)})
    if unknown:
        raise ValueError(f"deployments: no deployment named {unknown} in this app (it has "
                         f"{['ingress'] + [s.name for s in specs]})")  # fmt: skip
    handles = {}
    for spec in specs:
        conf = deployment_options(spec.name, a.deployments, a.timeout_s, stage_default(spec))
        if gpu:  # the graph's declaration: a GPU stage's share of a card; a CPU stage with CUDA hidden
            conf["ray_actor_options"] = {**conf.get("ray_actor_options", {}), **spec.ray_options(1)}
        handles[spec.name] = StageDeployment.options(name=spec.name, **conf).bind(
            spec, max_batch_tiles=a.max_batch_tiles, batch_wait_s=a.batch_wait_s, threads=a.threads
        )
    ingress = deployment_options("ingress", a.deployments, a.timeout_s)
    if gpu:  # the stages that run in the ingress (decode, merge): never on a GPU
        opts = ingress.get("ray_actor_options", {})
        ingress["ray_actor_options"] = {**opts, "runtime_env": hidden_gpu_env()}
    return Ingress.options(**ingress).bind(handles, workflows, a)


def _has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
