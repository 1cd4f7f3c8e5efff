"""The endpoint's per-deployment Serve options, typed: the builder's defaults and an operator's overrides (the
`deployments` argument of `serve.app:build_app`, and the `deployments:` list of serve/config.yaml, which Serve lays
over what the builder set). Both go through `DeploymentArgs`. And `StageDeployment`: the one deployment class
every model-holding stage runs in.

Serve itself checks little here: a misspelt autoscaling key (`upscale_delay: 5`) or deployment option is dropped
silently and its default (30 s) stays. `DeploymentArgs` refuses unknown names and checks values with Serve's own
models. It also keeps the drain promise: a replica that a scale-down (or an upgrade) removes first finishes the
requests it holds, so `graceful_shutdown_timeout_s` (how long Serve waits before killing it) covers the request
deadline (`timeout_s`) unless an operator sets it, and may not be set shorter.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig

from pipeline.runtime import use_threads
from pipeline.stages import run_stage

DRAIN_MARGIN_S = 5.0  # past the deadline: the ingress's cancel reaches the stage, which stops at its next step


class DeploymentArgs(BaseModel):
    """One deployment's Serve options (the fields of Serve's DeploymentSchema this endpoint takes). Unset fields keep
    the builder's default for that deployment, then Serve's."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: PositiveInt | None = None  # a fixed count, instead of autoscaling_config
    max_ongoing_requests: PositiveInt | None = None  # per replica: running (a batch) and waiting inside it
    max_queued_requests: int | None = None  # per caller, waiting for a replica; -1: no limit
    backpressure_config: dict | None = None  # Serve's BackpressureConfig: status_code, retry_after_s
    # Serve's AutoscalingConfig: min/max_replicas, target_ongoing_requests (queued + running per replica),
    # upscale/downscale_delay_s, look_back_period_s, metrics_interval_s (how often load is reported), ...
    autoscaling_config: dict | None = None
    graceful_shutdown_wait_loop_s: NonNegativeFloat | None = None  # a stopping replica checks its requests this often
    graceful_shutdown_timeout_s: NonNegativeFloat | None = None  # ... and is killed after this (unset: the deadline)
    health_check_period_s: PositiveFloat | None = None
    health_check_timeout_s: PositiveFloat | None = None
    max_replicas_per_node: PositiveInt | None = None
    ray_actor_options: dict | None = None  # num_cpus, num_gpus, resources, runtime_env (checked by Serve)
    # a stage deployment's batch settings, {"max_batch_tiles": N, "batch_wait_s": S}: Serve hands them to the
    # running replicas (`reconfigure`), so changing them needs no redeploy; unset: the app's max_batch_tiles and
    # batch_wait_s
    user_config: dict | None = None

    @field_validator("autoscaling_config", "backpressure_config")
    @classmethod
    def _strict_serve_model(cls, value: dict | None, info):
        if value is None:
            return value
        model = AutoscalingConfig if info.field_name == "autoscaling_config" else BackpressureConfig
        unknown = sorted(set(value) - set(model.model_fields))
        if unknown:
            raise ValueError(f"unknown {info.field_name} field(s) {unknown}, which Serve would ignore; known: "
                             f"{sorted(model.model_fields)}")  # fmt: skip
        model.model_validate(value)  # Serve's own ranges: min_replicas <= max_replicas, delays >= 0, ...
        return value

    @field_validator("user_config")
    @classmethod
    def _batch_settings(cls, value: dict | None):
        if value is not None:
            check_batch_settings(value)
        return value

    @model_validator(mode="after")
    def _one_way_to_size(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(f"num_replicas ({self.num_replicas}) and autoscaling_config exclude each other")
        return self

    def options(self) -> dict:
        return self.model_dump(exclude_none=True)


BATCH_SETTINGS = {"max_batch_tiles": int, "batch_wait_s": float}


def check_batch_settings(config: dict) -> dict:
    """A stage deployment's batch settings: known names, a tile budget that fits one capped request, a wait in
    [0, 1] s; ValueError naming what is wrong."""
    unknown = sorted(set(config) - set(BATCH_SETTINGS))
    if unknown:
        raise ValueError(f"unknown batch setting(s) {unknown}; known: {sorted(BATCH_SETTINGS)}")
    tiles, wait = config.get("max_batch_tiles", TILE_COST_CAP), config.get("batch_wait_s", 0.0)
    if isinstance(tiles, bool) or not isinstance(tiles, int) or not TILE_COST_CAP <= tiles <= 4096:
        raise ValueError(f"max_batch_tiles must be an integer in {TILE_COST_CAP}..4096, got {tiles!r}")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0.0 <= wait <= 1.0:
        raise ValueError(f"batch_wait_s must be a number of seconds in [0, 1], got {wait!r}")
    return config


def check_drain(deployments: dict[str, DeploymentArgs], timeout_s: float) -> None:
    """Refuse a drain window shorter than the request deadline: a replica removed by a scale-down would be killed
    with requests still running on it."""
    for name, d in deployments.items():
        if d.graceful_shutdown_timeout_s is not None and d.graceful_shutdown_timeout_s < timeout_s:
            raise ValueError(
                f"deployments.{name}.graceful_shutdown_timeout_s is {d.graceful_shutdown_timeout_s:g}s, under the "
                f"request deadline timeout_s={timeout_s:g}s: a replica removed by a scale-down would be killed with "
                "requests still running on it (leave it unset: the deadline plus a margin)"
            )


def deployment_options(name: str, overrides: dict[str, DeploymentArgs], timeout_s: float,
                       default: DeploymentArgs | None = None) -> dict:  # fmt: skip
    """Serve options for deployment `name`: its default (`default`, else the ingress's, else what the stage of that
    name declares in the default workflow), the operator's fields over it (a field replaces the default's whole
    value), and a drain window that covers the request deadline unless one is given."""
    base = default or DEFAULTS.get(name) or _declared(name)
    conf = {**base.options(), **overrides.get(name, DeploymentArgs()).options()}
    conf.setdefault("graceful_shutdown_timeout_s", timeout_s + DRAIN_MARGIN_S)
    return conf


# Local defaults; serve/config.yaml carries the same for `serve deploy`, with autoscaling.
# Fractional CPUs so the whole app fits a laptop-sized local cluster. The ingress admits `max_in_flight` upscale
# requests itself (503 + Retry-After in our JSON shape past that); Serve's own limits sit above it as a backstop, so
# /healthz and /v1/models still answer while the upscale queue is full.
DEFAULTS = {
    "ingress": DeploymentArgs(max_ongoing_requests=64, max_queued_requests=64, ray_actor_options={"num_cpus": 0.1},
                              backpressure_config={"status_code": 503, "retry_after_s": 2}),
}  # fmt: skip
STAGE_DEFAULT = DeploymentArgs(max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.1})


def _declared(name: str) -> DeploymentArgs:
    from pipeline.workflow import resolve_workflow

    spec = next((s for s in resolve_workflow().stages() if s.name == name), None)
    return stage_default(spec) if spec is not None else STAGE_DEFAULT


def stage_default(spec) -> DeploymentArgs:
    """A stage deployment's default Serve options, from its spec (`pipeline.spec.StageSpec`): requests a replica
    takes at once and its CPUs."""
    return DeploymentArgs(max_ongoing_requests=spec.serve_ongoing, ray_actor_options={"num_cpus": spec.serve_cpus})


# ---------------------------------------------------------------------------------------------- stage deployments
TILE_COST_CAP = 8  # a request counts as at most this many tiles, so one big image still forms a batch of its own


def batch_cost(rows: list[dict]) -> int:
    """A batch's size in tiles (a row without a plan yet counts as one), each request capped at TILE_COST_CAP."""
    return sum(min(getattr(r.get("plan"), "n_tiles", 1), TILE_COST_CAP) for r in rows)


@serve.deployment
class StageDeployment:
    """One deployment per model-holding stage of the graph (named after it): the stage class the job runs, its
    model loaded once per replica, requests batched by `@serve.batch` (sized in tiles) through the same envelope
    (`run_stage`) as the job. A caller that goes away is passed to the stage's `cancel`, so its work stops."""

    def __init__(self, spec, max_batch_tiles: int = 16, batch_wait_s: float = 0.0, threads: int = 0):
        import torch
        from ray.serve import metrics

        if threads:  # a CPU replica: Ray pins OMP_NUM_THREADS to its (fractional) CPU share
            torch.set_num_threads(threads)
        self.threads = threads
        check_batch_settings({"max_batch_tiles": max_batch_tiles, "batch_wait_s": batch_wait_s})
        self.spec, self.stage = spec, spec.build()
        if hasattr(self.stage, "warmup"):  # before `ready` answers: no request pays for kernel compiles
            self.stage.warmup()
        self.batch_sizes: Counter = Counter()
        self.batch_metric = metrics.Histogram(
            f"pidray_{spec.name}_batch_size", f"requests per {spec.name} batch", boundaries=[1, 2, 4, 8, 16, 32]
        )
        self.reconfigure({"max_batch_tiles": max_batch_tiles, "batch_wait_s": batch_wait_s})

    def reconfigure(self, config: dict) -> None:
        """Batch settings (the deployment's `user_config`), applied to the running replica: no redeploy."""
        check_batch_settings(config)
        self.batch_settings = {**getattr(self, "batch_settings", {}), **config}
        if "max_batch_tiles" in config:
            self.run.set_max_batch_size(config["max_batch_tiles"])
        if "batch_wait_s" in config:
            self.run.set_batch_wait_timeout_s(config["batch_wait_s"])

    def settings(self) -> dict:
        """The batch settings in force on this replica."""
        return dict(self.batch_settings)

    def ready(self) -> bool:
        return True

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.batch_sizes), "device": str(getattr(self.stage, "device", "cpu")),
                "stopped": getattr(self.stage, "stopped", 0)}  # fmt: skip

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=batch_cost)
    async def run(self, rows: list[dict]) -> list[dict]:
        self.batch_sizes[len(rows)] += 1
        self.batch_metric.observe(len(rows))
        return await asyncio.to_thread(self._run_here, rows)

    def _run_here(self, rows: list[dict]) -> list[dict]:
        """The stage on the calling (pool) thread, with a CPU replica's thread count set on that thread (set only in
        the constructor, the work ran on Ray's one-thread share)."""
        use_threads(self.threads)
        return run_stage(self.stage, self.spec.name, rows)

    async def __call__(self, row: dict) -> dict:
        """One row through the stage. `row` may be the response of the previous deployment, passed on unawaited by
        the ingress: Serve resolves it here, so the previous stage's result (a latent) never passes the ingress."""
        try:
            return await self.run(row)
        except asyncio.CancelledError:  # the caller timed out or disconnected: stop its work at the next step
            cancel = getattr(self.stage, "cancel", None)
            if cancel is not None and row.get("request_id"):
                cancel(row["request_id"])
            raise
