"""The stage graph: one definition of decode → encode → diffuse → merge, run by three drivers.

- `run_local` (here): a plain Python loop, used by `pidray upscale --local` and the Python API;
- `jobs/pipeline.py`: Ray Data, the model stages as actor pools;
- `serve/app.py`: Ray Serve deployments around the same classes.
Each `StageSpec` names its class, constructor kwargs (plain data), whether it holds a model (so a
driver runs it as an actor / replica), whether it wants a GPU, and its memory per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pipeline.memory import tile_bytes, weight_bytes
from pipeline.model.presets import get_preset
from pipeline.runtime import ModelOptions, pick_device, pick_dtype
from pipeline.stages import DecodeStage, DiffuseStage, EncodeStage, MergeStage, UpscaleOptions
from pipeline.stages.encode import plan_for


@dataclass(frozen=True)
class StageSpec:
    name: str
    cls: type
    kwargs: dict
    holds_model: bool  # load once per worker: actor pool / replica
    wants_gpu: bool  # ask for an accelerator where the cluster has one

    def build(self) -> Callable[[dict], dict]:
        return self.cls(**self.kwargs)


class StageGraph:
    def __init__(self, model: ModelOptions | None = None, options: UpscaleOptions | None = None):
        self.model = model or ModelOptions()
        self.options = options or UpscaleOptions()
        self.preset = get_preset(self.model.preset)
        m, o = dataclasses.asdict(self.model), self.options.to_dict()
        latent_vae = self.preset.vae != "rgb"
        self.stages = [
            StageSpec("decode", DecodeStage, {"max_pixels": self.options.max_pixels}, False, False),
            StageSpec("encode", EncodeStage, {"model": m, "options": o}, latent_vae, latent_vae),
            StageSpec("diffuse", DiffuseStage, {"model": m, "options": o}, True, True),
            StageSpec("merge", MergeStage, {"options": o}, False, False),
        ]

    def __getitem__(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

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
            "encode": plan.pad_hw[0] * plan.pad_hw[1] * 3 * 4 * 2,
            "diffuse": weight_bytes(cfg, dtype) + tile_bytes(cfg, plan.tile_out, dtype) + plan.n_tiles * 3 * 4
            * plan.tile_out[0] * plan.tile_out[1] * 4,
            "merge": canvas * 3 * 4 * 2 + out_px * 3 * 2,
        }  # fmt: skip

    def build_all(self) -> list[Callable[[dict], dict]]:
        return [s.build() for s in self.stages]

    def run_local(self, rows: Iterable[dict], stages: list | None = None) -> Iterator[dict]:
        """Run every row through every stage in this process (stages built once)."""
        stages = stages or self.build_all()
        for row in rows:
            for stage in stages:
                row = stage(row)
            yield row


def upscale_bytes(data: bytes, model: ModelOptions | None = None, options: UpscaleOptions | None = None, **row):
    """Python API: one image file's bytes in, the upscaled file's row out (`output`, `out_hw`, or `error`)."""
    graph = StageGraph(model, options)
    return next(graph.run_local([{"key": row.pop("key", "image"), "bytes": data, **row}]))
