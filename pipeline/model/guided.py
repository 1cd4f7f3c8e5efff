"""The sampler of the undistilled PiD checkpoints (the "teachers" the 4-step students were distilled from).

Facts from the official `PidModel.generate_samples_from_batch` (formulas, not code): Gaussian noise [B, 3, H, W]
from the seed is the only random draw (the solver is an ODE); multistep DPM-Solver++ of order min(steps, 2) on the
FLOW schedule with `time_uniform_flow` time steps; text-only classifier-free guidance — the unconditional branch is
the null caption (the negative prompt's embedding, computed once) with the same LQ latent and `degrade_sigma`, run
as its own forward beside the conditional one; the flow shift, unless one is given, is the dynamic
`base_shift · sqrt(sqrt(H·W) / base_size)` of the output size (6.0 at 2048); the sample clamped to [-1, 1].
The solver is the one PixelDiT's text-to-image sampler uses (`pipeline.model.t2i_sampler`); the network is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.model.t2i_sampler import dpm_solver_pp

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """A guided run's settings, resolved: steps, guidance scale, flow shift."""

    steps: int
    cfg_scale: float
    shift: float

    @property
    def forwards_per_step(self) -> int:
        """Network calls per solver step: the conditional and (with guidance) the unconditional one."""
        return 1 if self.cfg_scale == 1.0 else 2


def dynamic_shift(h: int, w: int, base_shift: float = 6.0, base_size: int = 2048) -> float:
    """The official shift for an H × W output when none is given: base_shift at base_size², growing as its 4th root."""
    return base_shift * math.sqrt(math.sqrt(h * w) / base_size)


def guided_sample(
    cond: Velocity,
    uncond: Velocity,
    noise: torch.Tensor,
    g: Guidance,
    *,
    on_x0: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    should_stop: Callable[[], bool] | None = None,
    prediction: str = "velocity",
) -> torch.Tensor:
    """noise [B, 3, H, W] -> samples in [-1, 1]. cond/uncond(x, t×1000) give the network's output (velocity, or x0
    for an x0-prediction model, the official `x_start` type) with the caption and with the null caption, both with
    the image's LQ condition; uncond is not called when cfg_scale is 1."""
    out = dpm_solver_pp(cond, noise.float(), steps=g.steps, shift=g.shift, cfg_scale=g.cfg_scale,
                        uncond_velocity=uncond, order=min(g.steps, 2), should_stop=should_stop,
                        on_x0=on_x0, prediction=prediction)  # fmt: skip
    return out.clamp(-1, 1)
