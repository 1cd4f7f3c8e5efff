"""The endpoint's per-deployment Serve options, typed: the builder's defaults and an operator's overrides (the
`deployments` argument of `serve.app:build_app`, and the `deployments:` list of serve/config.yaml, which Serve lays
over what the builder set). Both go through `DeploymentArgs`.

Serve itself checks little here: a misspelt autoscaling key (`upscale_delay: 5`) or deployment option is dropped
silently and its default (30 s) stays. `DeploymentArgs` refuses unknown names and checks values with Serve's own
models. It also keeps the drain promise: a replica that a scale-down (or an upgrade) removes first finishes the
requests it holds, so `graceful_shutdown_timeout_s` (how long Serve waits before killing it) covers the request
deadline (`timeout_s`) unless an operator sets it, and may not be set shorter.
"""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from ray.serve.config import AutoscalingConfig, BackpressureConfig

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

    @model_validator(mode="after")
    def _one_way_to_size(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(f"num_replicas ({self.num_replicas}) and autoscaling_config exclude each other")
        return self

    def options(self) -> dict:
        return self.model_dump(exclude_none=True)


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


def deployment_options(name: str, overrides: dict[str, DeploymentArgs], timeout_s: float) -> dict:
    """Serve options for deployment `name`: its default, the operator's fields over it (a field replaces the
    default's whole value), and a drain window that covers the request deadline unless one is given."""
    conf = {**DEFAULTS.get(name, STAGE_DEFAULT).options(), **overrides.get(name, DeploymentArgs()).options()}
    conf.setdefault("graceful_shutdown_timeout_s", timeout_s + DRAIN_MARGIN_S)
    return conf


# Local defaults; serve/config.yaml carries the same for `serve deploy`, with autoscaling.
# Fractional CPUs so the whole app fits a laptop-sized local cluster. The ingress admits `max_in_flight` upscale
# requests itself (503 + Retry-After in our JSON shape past that); Serve's own limits sit above it as a backstop, so
# /healthz and /v1/models still answer while the upscale queue is full.
DEFAULTS = {
    "ingress": DeploymentArgs(max_ongoing_requests=64, max_queued_requests=64, ray_actor_options={"num_cpus": 0.1},
                              backpressure_config={"status_code": 503, "retry_after_s": 2}),
    "encode": DeploymentArgs(max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.1}),
    "diffuse": DeploymentArgs(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.5}),
}  # fmt: skip
STAGE_DEFAULT = DeploymentArgs(max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.1})  # a stage added later
