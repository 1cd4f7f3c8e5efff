"""The stage graph: the one description of decode → encode → diffuse → merge that every driver runs.

- `StageGraph.run_local` (here): a plain Python loop, used by `pidray upscale --local` and the Python API;
- `jobs/pipeline.py`: Ray Data, one `map_batches` per stage (actor pools for stages that hold a model);
- `serve/app.py`: Ray Serve, one deployment per model-holding stage; the others run inside the ingress.
Each `StageSpec` names its class, constructor kwargs (plain data), whether it holds a model (so a driver runs it
as an actor / replica), its resources, and how many rows it takes per call. `with_io` adds the bulk job's read
and write stages. A driver never names a stage: adding one here is all it takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pipeline.memory import tile_bytes, weight_bytes
from pipeline.model.presets import get_preset
from pipeline.runtime import ModelOptions, encode_bytes, pick_device, pick_dtype
from pipeline.stages import DecodeStage, DiffuseStage, EncodeStage, MergeStage, ReadStage, WriteStage, run_stage
from pipeline.stages.common import UpscaleOptions, resolve
from pipeline.stages.encode import plan_for
from pipeline.stages.latent import LatentStage


@dataclass(frozen=True)
class StageSpec:
    name: str
    cls: type
    kwargs: dict
    holds_model: bool  # load once per worker: actor pool / replica
    wants_gpu: bool  # ask for an accelerator where the cluster has one
    batch_rows: int = 1  # rows per call: model stages batch across images
    num_cpus: float = 1.0  # per actor / task
    gpu_share: float = 0.0  # fraction of one GPU per actor where the cluster has GPUs (stages may share one)

    def build(self):
        return self.cls(**self.kwargs)

    def ray_options(self, cluster_gpus: float) -> dict:
        """Ray resources for one actor / task / replica of this stage, from the declaration above: its CPUs, its
        share of a GPU where the cluster has GPUs, and, for a stage that takes no GPU on a cluster that has them,
        CUDA hidden (Ray no longer hides GPUs from workers that ask for none: without this a CPU stage would load
        its model onto a GPU it was never given, unaccounted)."""
        on_gpu = self.wants_gpu and cluster_gpus > 0
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": self.gpu_share if on_gpu else 0}
        if cluster_gpus > 0 and not on_gpu:
            opts["runtime_env"] = hidden_gpu_env()
        return opts


def hidden_gpu_env() -> dict:
    """A Ray runtime_env in which CUDA sees no device: for workers that take no GPU on a cluster that has them."""
    return {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}


WORKFLOWS = ("upscale", "decode", "generate", "ldm")


def _pid_stages(model: dict, options: dict, holds_encode: bool, encode_share: float, diffuse_share: float,
                lq: bool = True) -> list[StageSpec]:  # fmt: skip
    """PiD's stages, the same in every workflow: encode (the LQ encoder and the captioner; `lq=False`: the rows
    bring their latent, only the plan and caption are made), diffuse, merge — with their shares of a GPU."""
    encode_kw = {"model": model, "options": options, "gpu_share": encode_share or 1.0, **({} if lq else {"lq": False})}
    return [
        StageSpec("encode", EncodeStage, encode_kw, holds_encode, holds_encode, batch_rows=8, gpu_share=encode_share),
        StageSpec("diffuse", DiffuseStage, {"model": model, "options": options, "gpu_share": diffuse_share}, True,
                  True, batch_rows=16, gpu_share=diffuse_share),
        StageSpec("merge", MergeStage, {"options": options}, False, False),
    ]  # fmt: skip


class StageGraph:
    """workflow "upscale": image files -> PiD; "decode": latent files (a generator's latents, captured x_t) -> PiD,
    the latent taking the VAE encoder's place (`latent_format` names what the files hold; None: the preset's);
    "generate": prompts -> PixelDiT (`model` is the text-to-image preset, `gen` its settings), then, when `upscale`
    names a PiD model, that preset's encode and diffuse stages on the generated image; "ldm": prompts -> a latent
    diffusion model's latent (`ldm`: its name or folder) -> PiD (`model`) decodes it instead of the model's VAE."""

    def __init__(self, model: ModelOptions | None = None, options: UpscaleOptions | None = None,
                 workflow: str = "upscale", latent_format: str | None = None, gen=None,
                 upscale: ModelOptions | None = None, ldm: str | None = None):  # fmt: skip
        if workflow not in WORKFLOWS:
            raise ValueError(f"workflow must be one of {WORKFLOWS}, got {workflow!r}")
        self.model = model or ModelOptions()
        self.options = options or UpscaleOptions()
        self.preset = get_preset(self.model.preset)
        self.workflow = workflow
        m, o = dataclasses.asdict(self.model), self.options.to_dict()
        captioned = self.preset.text_encoder != "none"
        # On a GPU cluster each GPU hosts one actor of every GPU stage: the shares of one GPU add up to 1.
        if workflow == "generate":
            self._generate_stages(gen, upscale, o)
        elif workflow == "ldm":  # a latent diffusion model's latent, then PiD without its VAE
            from pipeline.stages.ldm import LDMStage
            from pipeline.t2i import GenerateOptions

            g = gen.to_dict() if isinstance(gen, GenerateOptions) else dict(gen or {})
            ldm_kw = {"model": m, "ldm": ldm or "zimage-turbo", "options": g, "upscale": o}
            self.stages = [StageSpec("ldm", LDMStage, ldm_kw, True, True, batch_rows=1, gpu_share=0.5),
                           *_pid_stages(m, o, captioned, 0.1 if captioned else 0.0, 0.4, lq=False)]  # fmt: skip
        elif workflow == "decode":  # no VAE: the encode stage only plans and embeds the caption
            latent_kw = {"preset": self.model.preset, "latent_format": latent_format, "options": o}
            share = 0.1 if captioned else 0.0
            self.stages = [StageSpec("latent", LatentStage, latent_kw, False, False),
                           *_pid_stages(m, o, captioned, share, 1.0 - share, lq=False)]  # fmt: skip
        else:
            vae = self.preset.vae != "rgb"
            share = 0.25 if vae else 0.0
            self.stages = [StageSpec("decode", DecodeStage, {"max_pixels": self.options.max_pixels}, False, False),
                           *_pid_stages(m, o, vae, share, 1.0 - share)]  # fmt: skip

    def _generate_stages(self, gen, upscale: ModelOptions | None, o: dict) -> None:
        from pipeline.stages.generate import GenerateStage
        from pipeline.t2i import GenerateOptions

        gen = gen if isinstance(gen, GenerateOptions) else GenerateOptions.from_dict(gen or {})
        g = {
            "model": dataclasses.asdict(self.model),
            "options": gen.to_dict(),
            "emit": "image" if upscale else "pixels",
        }
        self.upscale = upscale
        if upscale is None:
            self.stages = [StageSpec("generate", GenerateStage, g, True, True, batch_rows=4, gpu_share=1.0),
                           StageSpec("merge", MergeStage, {"options": o}, False, False)]  # fmt: skip
            return
        up = get_preset(upscale.preset)
        if up.task != "upscale":
            raise ValueError(f"--upscale takes a PiD preset, not {up.name!r}")
        vae = up.vae != "rgb"
        self.stages = [StageSpec("generate", GenerateStage, g, True, True, batch_rows=4, gpu_share=0.5),
                       *_pid_stages(dataclasses.asdict(upscale), o, vae, 0.1 if vae else 0.0, 0.4)]  # fmt: skip

    def actors(self, gpus: int, requested: dict[str, int] | None = None) -> dict[str, int]:
        """Actors per model stage on a cluster with `gpus` GPUs: as requested, else one per GPU (one if none)."""
        requested = requested or {}
        return {s.name: requested.get(s.name) or (max(1, gpus) if s.wants_gpu and gpus else 1)
                for s in self.model_stages()}  # fmt: skip

    def gpus_needed(self, actors: dict[str, int]) -> float:
        return sum(s.gpu_share * actors.get(s.name, 0) for s in self.model_stages() if s.wants_gpu)

    def with_io(self, src, dst) -> StageGraph:
        """This graph with the bulk job's read (from `src`) and write (to `dst`) stages at its ends."""
        g = object.__new__(StageGraph)
        g.__dict__.update(self.__dict__)
        read = [StageSpec("read", ReadStage, {"src": src}, False, False)] if src is not None else []  # prompts: none
        g.stages = [*read, *self.stages, StageSpec("write", WriteStage, {"dst": dst}, False, False)]  # fmt: skip
        return g

    def __getitem__(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def model_stages(self) -> list[StageSpec]:
        return [s for s in self.stages if s.holds_model]

    def memory_estimate(self, in_hw: tuple[int, int], device: str | None = None) -> dict[str, int]:
        """Bytes per stage for one image of in_hw pixels (the diffuse stage at batch size 1)."""
        device_t = pick_device(device or self.model.device)
        dtype = pick_dtype(self.model.dtype, device_t)
        cfg = self.preset.config
        plan = plan_for(self.preset, self.options, in_hw)
        out_px = plan.out_hw[0] * plan.out_hw[1]
        canvas = plan.canvas_hw[0] * plan.canvas_hw[1]
        return {
            "decode": in_hw[0] * in_hw[1] * 3 * 2,
            "encode": encode_bytes(self.preset, plan.pad_hw, device_t),
            "diffuse": weight_bytes(cfg, dtype) + tile_bytes(cfg, plan.tile_out, dtype) + plan.n_tiles * 3 * 4
            * plan.tile_out[0] * plan.tile_out[1] * 4 + canvas * 3 * 4 * 2,
            "merge": out_px * 3 * 2 * 2,
        }  # fmt: skip

    def build_all(self) -> list:
        return [s.build() for s in self.stages]

    def run_local(self, rows: Iterable[dict], stages: list | None = None, batch: int = 8) -> Iterator[dict]:
        """Run rows through every stage in this process (stages built once), `batch` rows at a time so that
        the model stages batch across images; results come out in input order."""
        stages = stages or self.build_all()
        it = (r if "opts" in r else {**r, "opts": resolve(self.options, r)} for r in rows)  # where rows enter
        while chunk := [r for _, r in zip(range(batch), it)]:
            for spec, stage in zip(self.stages, stages):
                chunk = run_stage(stage, spec.name, chunk)
            yield from chunk


def upscale_bytes(data: bytes, model: ModelOptions | None = None, options: UpscaleOptions | None = None, **row):
    """Python API: one image file's bytes in, the upscaled file's row out (`output`, `out_hw`, or `error`)."""
    graph = StageGraph(model, options)
    return next(graph.run_local([{"key": row.pop("key", "image"), "bytes": data, **row}]))
