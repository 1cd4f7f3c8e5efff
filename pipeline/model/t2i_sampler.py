"""Multistep DPM-Solver++ on the flow schedule, with CFG: PixelDiT's text-to-image sampler and, through
`pipeline.model.guided`, the undistilled PiD checkpoints' sampler (one solver, two callers).

Facts taken from the official sampler (formulas, not code): flow schedule alpha_t = 1 − t, sigma_t = t,
lambda_t = log(alpha_t / sigma_t); time steps `time_uniform_flow`: u = linspace(t_start, t_end, N + 1),
s = 1 − u, t = flip(shift·s / (1 + (shift − 1)·s)) (so the last step lands on t = 0); the network is
called at t × 1000 and predicts a velocity v, turned into noise ε = (1 − t)·v + x; classifier-free
guidance ε_u + scale·(ε_c − ε_u) on one batch [uncond, cond]; data prediction x0 = (x − t·ε) / (1 − t);
second-order multistep updates with a first-order first step and (lower_order_final) last step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TIMESCALE = 1000.0


def flow_timesteps(steps: int, shift: float, t_start: float = 1.0, t_end: float = 1e-3, device=None) -> torch.Tensor:
    u = torch.linspace(t_start, t_end, steps + 1, device=device)
    s = 1.0 - u
    return (shift * s / (1 + (shift - 1) * s)).flip(0)


def _lambda(t: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - t) - torch.log(t)


def dpm_solver_pp(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    steps: int,
    shift: float,
    cfg_scale: float = 1.0,
    uncond_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    order: int = 2,
    should_stop: Callable[[], bool] | None = None,
    on_x0: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    prediction: str = "velocity",
) -> torch.Tensor:
    """Sample from noise x. velocity(x [2B or B, ...], t×1000 [2B or B]) runs the network.

    prediction: what the network returns, "velocity" (the reference solver's `flow` model type) or "x0" (its
    `x_start`: turned into noise ε = (x − (1 − t)·x0) / t before guidance).

    With cfg_scale != 1 and no `uncond_velocity`, `velocity` is called once on the batch [x, x] and must return
    [uncond; cond] predictions (the caller concatenates the two caption embeddings the same way: PixelDiT); with
    `uncond_velocity`, the conditional and unconditional predictions are two calls on x (the PiD teacher).
    `on_x0(step, x0)` may replace each data prediction (the tiles of one image blend theirs there); the sample is
    the last one, so the caller's last blend is the output.
    """
    if order not in (1, 2) or steps < order:
        raise ValueError(f"order must be 1 or 2 and steps >= order, got order={order}, steps={steps}")
    if prediction not in ("velocity", "x0"):
        raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")
    ts = flow_timesteps(steps, shift, device=x.device)
    B = x.shape[0]

    def noise_of(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 - t) * out + x if prediction == "velocity" else (x - (1 - t) * out) / t

    def x0_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.expand(B) * TIMESCALE
        if cfg_scale == 1.0:
            eps = noise_of(velocity(x, tb), x, t)
        elif uncond_velocity is not None:
            eps_u = noise_of(uncond_velocity(x, tb), x, t)
            eps_c = noise_of(velocity(x, tb), x, t)
            eps = eps_u + cfg_scale * (eps_c - eps_u)
        else:
            xx = torch.cat([x, x])
            eps_u, eps_c = noise_of(velocity(xx, torch.cat([tb, tb])), xx, t).chunk(2)
            eps = eps_u + cfg_scale * (eps_c - eps_u)
        return (x - t * eps) / (1 - t)

    def data(x: torch.Tensor, i: int) -> torch.Tensor:
        m = x0_of(x, ts[i])
        return on_x0(i, m) if on_x0 is not None else m

    def alpha(t):  # exp(log(1 − t)), as the reference solver evaluates it
        return torch.exp(torch.log(1 - t))

    def first(x, s, t, m_s):
        h = _lambda(t) - _lambda(s)
        return (t / s) * x - alpha(t) * torch.expm1(-h) * m_s

    def second(x, t_prev, m_prev, t):
        (t1, t0), (m1, m0) = t_prev, m_prev
        h0, h = _lambda(t0) - _lambda(t1), _lambda(t) - _lambda(t0)
        d1 = (h / h0) * (m0 - m1)
        phi = torch.expm1(-h)
        return (t / t0) * x - (alpha(t) * phi) * m0 - 0.5 * (alpha(t) * phi) * d1

    t_prev, m_prev = [ts[0]], [data(x, 0)]
    for i in range(1, steps + 1):
        if should_stop is not None and should_stop():
            from pipeline.errors import Cancelled

            raise Cancelled("stopped: the caller went away or its deadline passed")
        t = ts[i]
        step_order = min(order, i, steps + 1 - i)  # first step and last step are first order
        if step_order == 1:
            x = first(x, t_prev[-1], t, m_prev[-1])
        else:
            x = second(x, t_prev[-2:], m_prev[-2:], t)
        t_prev, m_prev = (t_prev + [t])[-order:], m_prev
        if i < steps:
            m_prev = (m_prev + [data(x, i)])[-order:]
    return x
