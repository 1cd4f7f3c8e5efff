"""How a preset samples, as an object (`Preset.sampling`): the step count options ask of it, its guidance, and the
network work a step costs. A preset names its sampling by a word in its data (`Preset.sampler`: "distilled" or
"guided"); everything that depends on it asks this object, so a new sampler is one class and one `SAMPLINGS` entry.
`preset.sampling` is the preset's sampling bound to it.

`settle` resolves options (anything with the fields of `pipeline.options.UpscaleOptions` that sampling reads: steps,
cfg_scale, shift, ensemble) where a row enters (`pipeline.options.Resolved`); `guidance` and `work_factor` read the
resolved ones.
"""

from __future__ import annotations

from pipeline.errors import BadParameter


class Sampling:
    """The distilled few-step sampler (`pipeline.model.sampler`): at most its schedule's steps, no guidance."""

    name = "distilled"
    guided = False  # two network calls a step (with and without the caption), the null caption needed

    def __init__(self, preset):
        self.preset = preset

    def steps(self, options) -> int:
        """The sampler steps these options ask of this preset: theirs, or the preset's default_steps. BadParameter
        for what this sampler cannot do: more steps than its schedule has, or guidance settings."""
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

    def settle(self, options) -> dict:
        """What these options resolve to on this preset where a row enters (`pipeline.options.Resolved`): the steps,
        the guidance scale and flow shift (None: not guided), the ensemble's shift in output pixels (0: off).
        BadParameter for what the sampler or the network cannot do."""
        return {"steps": self.steps(options), "cfg_scale": None, "shift": None,
                "ensemble": ensemble_shift(self.preset, options)}  # fmt: skip

    def guidance(self, options, out_hw: tuple[int, int]):
        """The guidance of an output of out_hw pixels, from resolved options (None: not guided)."""
        return None

    def work_factor(self, options, tile_hw: tuple[int, int]) -> float:
        """Pixels the network runs on per tile and step, relative to a plain pass, from resolved options: the
        shifted-grid ensemble adds its pass, `options.ensemble` pixels larger on every side."""
        s = options.ensemble
        h, w = tile_hw
        return 1.0 + (h + 2 * s) * (w + 2 * s) / (h * w) if s else 1.0


class GuidedSampling(Sampling):
    """The undistilled checkpoints' DPM-Solver++ with classifier-free guidance (`pipeline.model.guided`)."""

    name = "guided"
    guided = True

    def steps(self, options) -> int:
        return options.steps or self.preset.default_steps

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

    def work_factor(self, options, tile_hw: tuple[int, int]) -> float:
        """Network calls per step: the conditional one and, with guidance, the unconditional one."""
        return float(self.guidance(options, tile_hw).forwards_per_step)


SAMPLINGS: dict[str, type[Sampling]] = {s.name: s for s in (Sampling, GuidedSampling)}


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
