"""StageSpec: one stage of a workflow as every driver sees it — its class and resolved constructor arguments, whether
it holds a model, its resources, its rows per call and its memory need. The drivers (the local loop, Ray Data, Serve)
read these fields and never a stage's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Footprint:
    """What a stage's memory need depends on, for one image: the preset, the options, the tile plan, the device."""

    preset: object  # Preset
    options: object  # UpscaleOptions
    plan: object  # TilePlan of the image
    in_hw: tuple[int, int]
    device: object  # torch.device
    dtype: object  # torch.dtype of the network


@dataclass(frozen=True)
class StageSpec:
    name: str
    cls: type
    kwargs: dict  # resolved objects (ModelOptions, Preset, options): built as they are, in-process or in a worker
    holds_model: bool  # load once per worker: actor pool / replica
    wants_gpu: bool  # ask for an accelerator where the cluster has one
    batch_rows: int = 1  # rows per call: model stages batch across images
    num_cpus: float = 1.0  # per actor / task
    gpu_share: float = 0.0  # fraction of one GPU per actor where the cluster has GPUs (stages may share one)
    memory: Callable[[Footprint], int] | None = None  # bytes for one image (None: negligible)
    records_node: bool = False  # its rows record the Ray node that ran it (the manifest's `node`: the model work)
    serve_ongoing: int = 8  # Serve: requests one replica takes at once (its batches are formed from them)
    serve_cpus: float = 0.1  # Serve: CPUs per replica (fractional: the whole app fits a laptop-sized cluster)

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
