"""The options are declared once (pipeline.options): the command line, the row overrides, the checks, the settings
--resume compares and the endpoint's schema are all made from the declaration, so none of them can miss one."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from pipeline.errors import BadParameter
from pipeline.options import DEFAULTS, OPTS, OVERRIDES, SHAPING_OPTIONS, UpscaleOptions, check, openapi_parameters

# A valid value other than the default, and a bad one, for every option; an option added without a line here fails
# test_every_option_has_cases below.
CASES = {
    "scale": (2.0, 17.0), "steps": (2, 0), "cfg_scale": (3.0, 51.0), "shift": (2.0, 0.0), "seed": (7, -1),
    "caption": ("a cat", 5), "degrade_sigma": (0.1, 1.5), "sampler": ("ode", "euler"), "ensemble": (False, "no"),
    "tile": (256, 8), "overlap": (2, -1), "fusion": (False, 1), "tile_buckets": (True, "yes"), "format": ("jpeg", 3),
    "quality": (80, 101), "background": ("black", "not-a-colour"), "max_pixels": (1000, 0),
    "max_output_side": (4096, 0),
}  # fmt: skip


def test_every_option_has_cases():
    assert set(CASES) == set(OPTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_option_takes_its_values_and_refuses_others_by_name(name):
    good, bad = CASES[name]
    assert getattr(UpscaleOptions(**{name: good}), name) == good
    with pytest.raises(BadParameter, match=name):
        UpscaleOptions(**{name: bad})
    if OPTS[name].kind in (int, float):  # numbers: never a bool, never a non-finite float
        for value in (True, float("inf"), float("nan")):
            with pytest.raises(BadParameter, match=name):
                check(name, value)


def test_the_command_line_is_made_from_the_declaration():
    """Every option with flags is on `pidray upscale` and `decode`; no flag given = the declared defaults; each
    flag given sets its option (the conversion included)."""
    from jobs.upscale import config_from_args
    from pidray.cli import build_parser

    parser = build_parser()
    for cmd in ("upscale", "decode"):
        args = parser.parse_args([cmd, "a.png", "b/"])
        for name, o in OPTS.items():
            assert not o.flags or hasattr(args, name), f"{cmd} lacks {o.flags}"
    assert config_from_args(parser.parse_args(["upscale", "a.png", "b/"])).options == UpscaleOptions()
    argv = ["upscale", "a.png", "b/"]
    guided = ("cfg_scale", "shift")  # the default preset is distilled: refused by it, so read from the parse alone
    for name, (good, _) in CASES.items():
        o = OPTS[name]
        if not o.flags or name in guided:
            continue
        if o.kind is bool:
            if o.cli == "both":
                argv.append(o.flags[-1] if good else "--no-" + o.flags[-1][2:])
            elif good != DEFAULTS[name]:
                argv.append(o.flags[-1])
        else:
            argv += [o.flags[-1], str(good)]
    options = config_from_args(parser.parse_args(argv)).options
    assert options == UpscaleOptions(**{k: v for k, (v, _) in CASES.items() if k not in guided})
    args = parser.parse_args(["upscale", "a.png", "b/", "--cfg-scale", "3", "--shift", "2"])
    assert (args.cfg_scale, args.shift) == (3.0, 2.0)


def test_row_overrides_and_typed_rows_are_the_declared_ones():
    from pipeline.stages.rows import Overrides

    assert set(Overrides.__annotations__) == set(OVERRIDES) == {n for n, o in OPTS.items() if o.row}
    row = {name: CASES[name][0] for name in OVERRIDES}
    overridden = UpscaleOptions().overridden(row)
    assert all(getattr(overridden, n) == row[n] for n in OVERRIDES)
    with pytest.raises(BadParameter, match="quality"):
        UpscaleOptions().overridden({"quality": 101})
    base = UpscaleOptions(seed=3)
    assert base.overridden({"key": "a", "seed": None}) is base  # a row that sets nothing: the options themselves


def test_entering_resolves_every_option_the_preset_decides():
    """`Workflow.enter` gives each row its options resolved (`Resolved`, the fields of `UpscaleOptions`): the preset's
    scale, steps, tile, overlap and ensemble filled in, a guided preset's guidance scale and fixed shift; only what
    the input decides stays open (the format: the input's; a guided preset's dynamic shift: the output's size)."""
    from pipeline.model.presets import get_preset
    from pipeline.options import Resolved
    from pipeline.runtime import ModelOptions
    from pipeline.workflow import resolve_workflow

    assert [f.name for f in fields(Resolved)] == [f.name for f in fields(UpscaleOptions)]
    small = resolve_workflow("upscale", ModelOptions("small"))
    row = small.enter({"key": "a", "seed": 5})
    o = row["opts"]
    assert isinstance(o, Resolved) and small.enter(row) is row  # entered once
    assert (o.scale, o.steps, o.tile, o.overlap, o.ensemble, o.seed) == (4.0, 1, 256, 8, 4, 5)
    assert (o.cfg_scale, o.shift, o.format) == (None, None, None)  # distilled: no guidance; format: the input's
    assert small.enter({"key": "b"})["opts"] is small.resolved  # no override: the workflow's own, resolved once
    o = small.enter({"key": "c", "scale": 2, "format": "jpeg"})["opts"]
    assert (o.scale, o.format) == (2.0, "jpeg")
    flux = resolve_workflow("upscale", ModelOptions("flux-2k"), UpscaleOptions(tile=1024, overlap=3, steps=2))
    o = flux.resolved
    assert (o.scale, o.steps, o.tile, o.overlap, o.ensemble) == (4.0, 2, 1024, 3, 0)
    assert flux.enter({"key": "a"})["opts"].tile == 1024 and resolve_workflow("upscale", ModelOptions(
        "flux-2k")).resolved.tile == get_preset("flux-2k").envelope[1]  # fmt: skip
    guided = resolve_workflow("upscale", ModelOptions("flux-2kto4k-v1.5-undistilled"))
    o = guided.enter({"key": "a", "cfg_scale": 2})["opts"]
    assert (o.steps, o.cfg_scale, o.shift) == (25, 2.0, None)  # the shift: dynamic, from the output's size
    assert guided.enter({"key": "a", "shift": 3})["opts"].shift == 3.0 and guided.resolved.cfg_scale == 5.0
    g = get_preset("flux-2kto4k-v1.5-undistilled").sampling.guidance(o, (4096, 4096))
    assert (g.steps, g.cfg_scale) == (25, 2.0) and g.shift == pytest.approx(6.0 * 2**0.5)
    for bad, message in [({"steps": 9}, "steps must be in 1..4"), ({"shift": 2.0}, "distilled and takes neither"),
                         ({"quality": 0}, "quality")]:  # fmt: skip
        with pytest.raises(BadParameter, match=message):
            small.enter({"key": "a", **bad})
    with pytest.raises(BadParameter, match="degrade_sigma"):  # what a stage sets after entry is checked too
        replace(small.resolved, degrade_sigma=2.0)


def test_every_shaping_option_changes_the_settings_resume_compares():
    """Forgetting an option in --resume's settings would keep outputs made with other settings: every option
    declared as shaping the output changes them, and the others do not."""
    from jobs.config import JobConfig
    from jobs.settings import SHAPING, output_settings
    from pipeline.runtime import ModelOptions

    base = JobConfig(src="in/", dst="out/", model=ModelOptions("small"), options=UpscaleOptions())
    before = output_settings(base)
    for name in OPTS:
        value = CASES[name][0]
        if name in ("cfg_scale", "shift"):  # the small preset is distilled: take them on a copy of the settings
            continue
        now = output_settings(replace(base, options=replace(base.options, **{name: value})))
        changed = {k for k in SHAPING if before.get(k) != now.get(k)}
        assert (name in changed) == (name in SHAPING_OPTIONS), (name, changed)
    assert {"cfg_scale", "shift"} <= set(SHAPING)


def test_the_endpoint_schema_lists_every_request_option_with_its_range():
    params = {p["name"]: p for p in openapi_parameters()}
    assert set(params) == set(OVERRIDES)
    assert params["steps"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 200}
    assert params["quality"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 95}
    assert params["degrade_sigma"]["schema"]["maximum"] == 1.0 and params["caption"]["schema"]["type"] == "string"


def test_declared_defaults_are_the_dataclass_defaults():
    assert {f.name: f.default for f in fields(UpscaleOptions)} == DEFAULTS


def test_a_file_job_with_resume_resolves_its_preset_once(tmp_path, monkeypatch):
    """`pidray upscale a.png out/b.png --resume`: the job's configuration is copied twice on its way in (the named
    output, the resume check); its workflow is resolved once and kept, its options following the copy's."""
    import pipeline.workflow as workflow
    from jobs.settings import check_resume
    from jobs.single import file_destination
    from jobs.upscale import config_from_args
    from pidray.cli import build_parser

    from conftest import ROOT

    looked_up = []
    real = workflow.get_preset
    monkeypatch.setattr(workflow, "get_preset", lambda name: looked_up.append(name) or real(name))
    src = ROOT / "pipeline" / "assets" / "samples" / "chelsea.png"
    args = build_parser().parse_args(["upscale", str(src), str(tmp_path / "b.jpg"), "--resume", "-q", "80"])
    cfg = check_resume(file_destination(config_from_args(args)), note=lambda _: None)
    assert cfg.flow.preset.name == "small" and looked_up == ["small"]
    assert cfg.flow.options == cfg.options and cfg.options.format == "jpg" and cfg.options.quality == 80
