"""How a preset samples, as an object (`Preset.sampling`): the step count options ask of it, its guidance, the
network work a step costs, and the sampler loop itself (`run`). A preset names its sampling by a word in its data
(`Preset.sampler`: "distilled" or "guided"); everything that depends on it asks this object, so a new sampler is its
loop module and one class here (with its `SAMPLINGS` entry). `preset.sampling` is the preset's sampling bound to it.

`settle` resolves options (anything with the fields of `pipeline.options.UpscaleOptions` that sampling reads: steps,
cfg_scale, shift, ensemble, sampler) where a row enters (`pipeline.options.Resolved`); `guidance`, `work_factor` and
`run` read the resolved ones.

`run` is handed the network as `predict(x, t, null=False)`: the prediction for the tiles `x` at times `t` (× 1000,
float32, one per tile), with their captions, or with the null caption when `null` (only a sampler whose `null_caption`
is True asks for it). The diffuse stage (`pipeline.stages.diffuse`) builds `predict` and the noise, and fuses tiles in
`on_x0`; which loop runs is this object's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pipeline.errors import BadParameter


class Predict(Protocol):
    def __call__(self, x, t, null: bool = False):
        """The network's output for the tiles x at times t (× 1000); with the null caption when `null`."""


class Sampling:
    """What every sampling answers; a sampler is a subclass with its `name` in `SAMPLINGS`."""

    name = ""
    guided = False  # two network calls a step (with and without the caption) with guidance
    null_caption = False  # the loop calls predict(..., null=True): rows carry the null caption's embedding

    def __init__(self, preset):
        self.preset = preset

    def steps(self, options) -> int:
        """The sampler steps these options ask of this preset: theirs, or the preset's default_steps."""
        return options.steps or self.preset.default_steps

    def settle(self, options) -> dict:
        """What these options resolve to on this preset where a row enters (`pipeline.options.Resolved`): the steps,
        the guidance scale and flow shift (None: not guided), the ensemble's shift in output pixels (0: off).
        BadParameter for what the sampler or the network cannot do."""
        return {"steps": self.steps(options), "cfg_scale": None, "shift": None,
                "ensemble": ensemble_shift(self.preset, options)}  # fmt: skip

    def guidance(self, options, out_hw: tuple[int, int]):
        """This sampler's settings for an output of out_hw pixels, from resolved options, beyond the steps (None:
        none). Images sampled together share them: they are part of the diffuse stage's grouping key."""
        return None

    def warm_guidance(self):
        """The settings of a one-step warm-up that makes every kind of network call a real step makes."""
        return None

    def work_factor(self, options, tile_hw: tuple[int, int]) -> float:
        """Pixels the network runs on per tile and step, relative to a plain pass, from resolved options: the
        shifted-grid ensemble adds its pass, `options.ensemble` pixels larger on every side."""
        s = options.ensemble
        h, w = tile_hw
        return 1.0 + (h + 2 * s) * (w + 2 * s) / (h * w) if s else 1.0

    def run(self, predict: Predict, noise: Callable, *, steps: int, guidance, options, prediction: str, dtype,
            on_x0: Callable | None = None, should_stop: Callable[[], bool] | None = None):  # fmt: skip
        """The sampler loop over one batch of tiles; returns x0 in [-1, 1], on the noise's device.

        predict: the network (module docstring). noise(draw): draw 0 is the initial noise [N, 3, h, w], draws 1.. the
        re-noising ones (`pipeline.model.sampler.NoiseSource`). steps and guidance: the group's (`guidance` above).
        prediction: what the network predicts ("velocity" or "x0"). dtype: the network's. on_x0(step, x0) may replace
        each x0 estimate (the tiles of an image blend theirs there; the one of step steps - 1 is the output).
        should_stop: a loop may check it between steps (predict checks it before every call)."""
        raise NotImplementedError


class DistilledSampling(Sampling):
    """The distilled few-step sampler (`pipeline.model.sampler`): at most its schedule's steps, no guidance; fresh
    noise each step (options.sampler "sde") or an Euler step ("ode")."""

    name = "distilled"

    def steps(self, options) -> int:
        """The options' or the preset's steps; BadParameter for what this sampler cannot do: more steps than its
        schedule has, or guidance settings."""
        from pipeline.model.sampler import DISTILLED_T

        preset = self.preset
        steps = options.steps or preset.default_steps
        most = len(DISTILLED_T) - 1
        if steps > most:
            raise BadParameter(f"steps must be in 1..{most} for the distilled preset {preset.name}, got {steps}")
        given = [k for k in ("cfg_scale", "shift") if getattr(options, k) is not None]
        if given:
            raise BadParameter(f"{' and '.join(given)} apply to the undistilled presets (guided sampling); "
                               f"{preset.name} is distilled and takes neither")  # fmt: skip
        return steps

    def run(self, predict, noise, *, steps, guidance, options, prediction, dtype, on_x0=None, should_stop=None):
        from pipeline.model.sampler import sample

        return sample(predict, noise, steps=steps, mode=options.sampler, prediction=prediction, on_x0=on_x0)


class GuidedSampling(Sampling):
    """The undistilled checkpoints' DPM-Solver++ with classifier-free guidance (`pipeline.model.guided`): the
    caption's and the null caption's predictions each step, from the initial noise alone."""

    name = "guided"
    guided = True
    null_caption = True

    def settle(self, options) -> dict:
        """The steps, guidance scale and flow shift: the options', else the preset's; a shift still None is the
        official dynamic rule, which the output's size decides (`guidance`)."""
        g = self.preset.guidance
        shift = options.shift if options.shift is not None else g.get("shift")
        cfg = options.cfg_scale if options.cfg_scale is not None else float(g.get("cfg_scale", 1.0))
        return {"steps": self.steps(options), "cfg_scale": cfg, "shift": None if shift is None else float(shift),
                "ensemble": ensemble_shift(self.preset, options)}  # fmt: skip

    def guidance(self, options, out_hw: tuple[int, int]):
        """Steps, guidance scale and flow shift for an output of out_hw pixels, from resolved options: a shift of
        None is resolved here, by the official dynamic rule for that size."""
        from pipeline.model.guided import Guidance, dynamic_shift

        shift = options.shift
        if shift is None:
            g = self.preset.guidance
            shift = dynamic_shift(*out_hw, float(g.get("base_shift", 6.0)), int(g.get("base_size", 2048)))
        return Guidance(options.steps, options.cfg_scale, float(shift))

    def warm_guidance(self):
        """One step with guidance on: both forwards of a guided step."""
        from pipeline.model.guided import Guidance

        return Guidance(1, 2.0, 1.0)

    def work_factor(self, options, tile_hw: tuple[int, int]) -> float:
        """Network calls per step: the conditional one and, with guidance, the unconditional one."""
        return float(self.guidance(options, tile_hw).forwards_per_step)

    def run(self, predict, noise, *, steps, guidance, options, prediction, dtype, on_x0=None, should_stop=None):
        """Only the initial noise is drawn (the solver is an ODE); the network sees t in its own dtype, as the
        official teacher does."""
        from pipeline.model.guided import guided_sample

        def cond(x, t):
            return predict(x, t.to(dtype))

        def uncond(x, t):
            return predict(x, t.to(dtype), null=True)

        return guided_sample(cond, uncond, noise(0), guidance, on_x0=on_x0, should_stop=should_stop,
                             prediction=prediction)  # fmt: skip


SAMPLINGS: dict[str, type[Sampling]] = {s.name: s for s in (DistilledSampling, GuidedSampling)}


def ensemble_shift(preset, options) -> int:
    """The shifted-grid ensemble's shift in output pixels for these options (0: off); BadParameter when asked of a
    model that cannot use it."""
    from pipeline.model.network import check_shift

    if options.ensemble is False or (options.ensemble is None and not preset.shift_ensemble):
        return 0
    shift = preset.shift_ensemble or preset.config.patch_size // 2
    try:
        check_shift(preset.config, shift)
    except ValueError as e:
        raise BadParameter(f"ensemble: {e}; preset {preset.name} runs without it (--no-ensemble)") from None
    return shift
