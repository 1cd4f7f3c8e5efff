"""The distilled few-step sampler. It knows nothing of the network: it is handed a `predict` function.

Flow matching with x_t = (1 − t)·x0 + t·ε. At each step the prediction (velocity v = ε − x0, or x0)
gives x0 = x_t − t·v; the SDE sampler re-noises to the next t with fresh noise, the ODE sampler
takes an Euler step; the last step returns x0. Noise comes from a `NoiseSource` so that tiles
can draw noise keyed to global coordinates; `GeneratorNoise` reproduces the official call order
(initial noise, then one draw before each re-noising).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

DISTILLED_T = (0.999, 0.866, 0.634, 0.342, 0.0)
ONE_STEP_T = 1.0  # the official single-step path starts from t = 1, not t_list[0]
TIMESCALE = 1000.0


class NoiseSource(Protocol):
    def __call__(self, draw: int) -> torch.Tensor:
        """Noise for draw 0 (initial) and draws 1..N-1 (before each re-noising)."""


class GeneratorNoise:
    """Draws randn of one shape from a torch.Generator in call order, like the official sampler."""

    def __init__(self, shape, generator: torch.Generator, device="cpu", dtype=torch.float32):
        self.shape, self.generator, self.device, self.dtype = tuple(shape), generator, device, dtype

    def __call__(self, draw: int) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.device, dtype=self.dtype)


def t_schedule(steps: int, t_list=DISTILLED_T) -> list[float]:
    """The distilled t list, or a sub-sample of it for fewer steps (official index rule)."""
    n = len(t_list) - 1
    if not isinstance(steps, int) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an integer in 1..{n} for this distilled schedule, got {steps!r}")
    if abs(t_list[-1]) > 1e-6:
        raise ValueError(f"t_list must end at 0, got {list(t_list)}")
    if steps == 1:
        return [ONE_STEP_T, 0.0]
    if steps == n:
        return [float(t) for t in t_list]
    idx = torch.linspace(0, n, steps + 1).round().long().tolist()
    return [float(t_list[i]) for i in idx]


def _wide(x: torch.Tensor) -> torch.dtype:
    """float64 on the CPU (the official arithmetic, bit-for-bit); float32 on an accelerator (float64 is ~60x slower)."""
    return torch.float64 if x.device.type == "cpu" else torch.float32


def to_x0(x: torch.Tensor, pred: torch.Tensor, t: float, prediction: str) -> torch.Tensor:
    if prediction == "x0":
        return pred.to(x.dtype)
    w = _wide(x)
    return (x.to(w) - t * pred.to(w)).to(x.dtype)


def to_velocity(x: torch.Tensor, pred: torch.Tensor, t: float, prediction: str) -> torch.Tensor:
    if prediction == "velocity":
        return pred
    w = _wide(x)
    return ((x.to(w) - pred.to(w)) / max(t, 5e-2)).to(x.dtype)


def sample(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: NoiseSource,
    *,
    steps: int = 4,
    t_list=DISTILLED_T,
    mode: str = "sde",
    prediction: str = "velocity",
    on_x0: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the sampler; returns x0 clamped to [-1, 1].

    predict(x, t_scaled[B]) -> network output. `on_x0(step, x0)` may replace each x0 estimate
    (used to fuse overlapping tiles per step); it is called before re-noising and at the end.
    """
    if mode not in ("sde", "ode"):
        raise ValueError(f"sampler mode must be 'sde' or 'ode', got {mode!r}")
    ts = t_schedule(steps, t_list)
    x = noise(0)  # the state (x, x0) lives wherever the noise source puts it: the model's device
    draw = 1
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        t_batch = torch.full((x.shape[0],), t_cur * TIMESCALE, device=x.device, dtype=torch.float32)
        pred = predict(x, t_batch)
        if t_next > 0 and mode == "ode":
            x = x + (t_next - t_cur) * to_velocity(x, pred, t_cur, prediction)
            continue
        x0 = to_x0(x, pred, t_cur, prediction)
        if on_x0 is not None:
            x0 = on_x0(i, x0)
        if t_next > 0:
            eps = noise(draw).to(device=x0.device, dtype=x0.dtype, non_blocking=True)
            draw += 1
            x = (1.0 - t_next) * x0 + t_next * eps
        else:
            x = x0
    return x.clamp(-1, 1)


def degrade_latent(latent: torch.Tensor, sigma: float, eps: torch.Tensor, *, variance_preserving: bool = False):
    """Forward-noise a clean latent to `degrade_sigma` as the checkpoint was trained.

    flow matching: (1 − σ)·z + σ·ε;  variance preserving (SDXL): sqrt(1 − σ²)·z + σ·ε.
    """
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"degrade_sigma must be in [0, 1], got {sigma}")
    if sigma == 0.0:
        return latent
    keep = (1.0 - sigma * sigma) ** 0.5 if variance_preserving else 1.0 - sigma
    return keep * latent + sigma * eps.to(latent.dtype)
