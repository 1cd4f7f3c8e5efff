"""A job's configuration is one frozen object, its workflow resolved once as it is built: a copy keeps it (its
options following the copy's), a copy with another model or workflow resolves its own, and no front end changes a
config after building it. The errors resolving raises come where they always did, in the same words."""

import dataclasses
import pickle

import pytest

import pipeline.workflow as workflow_module
from jobs.config import JobConfig
from pipeline.errors import SetupError
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions

from conftest import ROOT

SAMPLE = ROOT / "pipeline" / "assets" / "samples" / "chelsea.png"


@pytest.fixture
def lookups(monkeypatch):
    """The preset names looked up while resolving a workflow, in order."""
    calls = []
    real = workflow_module.get_preset
    monkeypatch.setattr(workflow_module, "get_preset", lambda name: calls.append(name) or real(name))
    return calls


def test_a_job_config_is_frozen_and_its_workflow_is_there_once_built(lookups):
    cfg = JobConfig("in", "out", ModelOptions("flux-2k"))
    assert lookups == ["flux-2k"] and cfg.flow.preset.name == "flux-2k"  # resolved as it is built, not on first use
    for name, value in (("dry_run", True), ("dst", "elsewhere"), ("flow", None), ("options", UpscaleOptions())):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, name, value)
    assert cfg.dry_run is False and cfg.flow.preset.name == "flux-2k"
    again = pickle.loads(pickle.dumps(cfg))  # as Ray hands it to a worker: with its flow, nothing looked up
    assert again == cfg and again.flow == cfg.flow and lookups == ["flux-2k"]


def test_copies_keep_the_workflow_their_preset_was_looked_up_for(lookups):
    cfg = JobConfig("in", "out", ModelOptions("small"), UpscaleOptions(seed=3))
    copies = [dataclasses.replace(cfg, resume=True), cfg.with_(dry_run=True, local=False),
              cfg.with_(dst="out/sub", output_name="b"),
              dataclasses.replace(cfg, captions={"a.png": "a cat"})]  # fmt: skip
    assert all(c.flow is cfg.flow for c in copies)
    assert copies[0].with_(overwrite=True, resume=False).flow is cfg.flow  # a copy of a copy too
    other = cfg.with_(options=UpscaleOptions(seed=4, format="png"))
    assert other.flow.options == other.options and other.flow.preset is cfg.flow.preset
    assert cfg.flow.options == cfg.options == UpscaleOptions(seed=3)  # the original's own flow is untouched
    assert dataclasses.replace(other, options=cfg.options).flow == cfg.flow
    assert lookups == ["small"]


def test_a_copy_of_what_the_workflow_is_made_of_resolves_its_own(lookups):
    cfg = JobConfig("in", "out", ModelOptions("small"))
    assert cfg.with_(model=ModelOptions("flux-2k")).flow.preset.name == "flux-2k"
    decode = cfg.with_(model=ModelOptions("flux-2k"), workflow="decode")
    assert decode.flow.reads_latents and decode.flow.latent_format is None
    assert decode.with_(latent_format="flux").flow.latent_format == "flux"
    assert lookups == ["small", "flux-2k", "flux-2k"]
    ldm = JobConfig("p.txt", "out", ModelOptions("flux-2kto4k-v1.5"), workflow="ldm", ldm="zimage-turbo")
    assert ldm.with_(ldm="flux").flow.ldm == "flux" and ldm.with_(generator_offload=True).flow.offload
    assert ldm.with_(gen={"steps": 3}).flow.gen.steps == 3 and ldm.flow.gen.steps is None
    gen = JobConfig("p.txt", "out", ModelOptions("pixeldit-2k"), workflow="generate")
    up = gen.with_(upscale=ModelOptions("flux-2k"))
    assert gen.flow.upscale_preset is None and up.flow.upscale_preset.name == "flux-2k"
    assert up.with_(resume=True).flow is up.flow
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        cfg.with_(model=ModelOptions("nope"))


def test_a_file_job_with_resume_keeps_one_resolution_through_each_copy(tmp_path, lookups, monkeypatch):
    """`pidray upscale a.png out/b.jpg --resume`: DST turned into its folder and the output's name, then --resume's
    check (the settings DST's manifest records: the same, then others with --resume=redo-changed)."""
    import jobs.settings as settings
    from jobs.single import file_destination
    from jobs.upscale import config_from_args
    from pidray.cli import build_parser

    same = settings.output_settings
    for mode, recorded in (("--resume", same), ("--resume=redo-changed", lambda cfg: {**same(cfg), "steps": 9})):
        lookups.clear()
        args = build_parser().parse_args(["upscale", str(SAMPLE), str(tmp_path / "out" / "b.jpg"), mode, "-q", "80"])
        built = config_from_args(args)
        named = file_destination(built, note=lambda _: None)
        monkeypatch.setattr(settings, "recorded_settings", lambda dst, c=named, f=recorded: f(c))
        cfg = settings.check_resume(named, note=lambda _: None)
        assert (cfg.dst, cfg.output_name, cfg.options.format) == (str(tmp_path / "out"), "b", "jpg")
        assert (cfg.resume, cfg.overwrite) == ((True, False) if mode == "--resume" else (False, True))
        assert cfg.flow.options == cfg.options and cfg.flow.options.quality == 80
        assert cfg.flow.preset is built.flow.preset and lookups == ["small"]


def test_generate_builds_its_config_once_where_it_resolved_it_before(tmp_path):
    """`pidray generate`: a prompt file's job refuses --resume with --overwrite before its preset is looked up, and
    one prompt's job names a missing folder first; the config is built once, as a dry run, never changed after."""
    from jobs.generate import _config, _one
    from pidray.cli import build_parser

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    parse = build_parser().parse_args
    with pytest.raises(SetupError, match="--overwrite and --resume contradict"):
        _config(parse(["generate", "--prompts", str(prompts), str(tmp_path / "o"), "-m", "nope", "--resume",
                       "--overwrite"]), str(prompts), str(tmp_path / "o"))  # fmt: skip
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        _config(parse(["generate", "--prompts", str(prompts), str(tmp_path / "o"), "-m", "nope"]), str(prompts),
                str(tmp_path / "o"))  # fmt: skip
    cfg = _config(parse(["generate", "--prompts", str(prompts), str(tmp_path / "o")]), str(prompts), "o")
    assert cfg.flow.takes_prompts and cfg.flow.preset.name == "pixeldit-2k"
    with pytest.raises(SetupError, match="does not exist"):
        _one(parse(["generate", "a cat", str(tmp_path / "no" / "x.png"), "-m", "nope"]))
