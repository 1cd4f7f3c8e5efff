"""The stage graph is the one description every driver runs (issue 11): a stage added to the graph runs in the local
loop, in Ray Data and in the Serve app with no edit in jobs/ or serve/; the failure envelope isolates rows."""

import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.graph import StageGraph, StageSpec
from pipeline.stages import run_stage

from conftest import png_bytes


class Stamp:
    """A no-op stage that leaves a mark on each row (and can hold a 'model')."""

    def __init__(self, mark: str = "stamped"):
        self.mark = mark

    def process(self, row):
        return {**row, "notes": [*row.get("notes", []), self.mark]}


def _insert_before_diffuse(monkeypatch, spec: StageSpec):
    original = StageGraph.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.stages.insert(self.names().index("diffuse"), spec)

    monkeypatch.setattr(StageGraph, "__init__", init)


def _with_stamp(monkeypatch, holds_model: bool):
    _insert_before_diffuse(monkeypatch, StageSpec("stamp", Stamp, {"mark": "stamped"}, holds_model, False))


def _ray_job(tmp_path, weights, expect_ok: int, **ray_init) -> list[dict]:
    """The job from tmp_path/in to tmp_path/out on a fresh local Ray cluster; its manifest rows."""
    import ray

    from jobs.manifest import read_manifest
    from jobs.pipeline import JobConfig, run_job
    from pipeline.runtime import ModelOptions
    from pipeline.storage import Location

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, **ray_init)
    try:
        cfg = JobConfig(str(tmp_path / "in"), str(tmp_path / "out"), ModelOptions(weights=weights), progress=False,
                        local=False)  # fmt: skip
        assert run_job(cfg).ok == expect_ok
    finally:
        ray.shutdown()
    return read_manifest(Location(str(tmp_path / "out")))


def test_a_new_stage_runs_in_the_local_job_without_edits(monkeypatch, bicubic_weights, tmp_path):
    from jobs.manifest import read_manifest
    from jobs.pipeline import JobConfig, run_job
    from pipeline.runtime import ModelOptions
    from pipeline.storage import Location

    _with_stamp(monkeypatch, holds_model=False)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    cfg = JobConfig(str(tmp_path / "in"), str(tmp_path / "out"), ModelOptions(weights=bicubic_weights), local=True,
                    progress=False)  # fmt: skip
    assert run_job(cfg).ok == 1
    (row,) = read_manifest(Location(str(tmp_path / "out")))
    assert "stamped" in row["notes"]


def test_a_new_model_stage_becomes_a_serve_deployment(monkeypatch):
    from serve.app import deployment_names

    _with_stamp(monkeypatch, holds_model=True)
    assert deployment_names("small") == ["ingress", "stamp", "diffuse"]


def test_envelope_skips_failed_rows_times_and_isolates():
    class Picky:
        calls = 0

        def process(self, row):
            if row["x"] == 2:
                raise ValueError("two is bad")
            return {**row, "y": row["x"] * 10}

        def process_batch(self, rows):
            Picky.calls += 1
            return [self.process(r) for r in rows]

    rows = [{"x": 1}, {"x": 2}, {"x": 3}, {"x": 4, "status": "failed", "error": "earlier"}]
    out = run_stage(Picky(), "picky", rows)
    assert [r.get("y") for r in out] == [10, None, 30, None]
    assert out[1]["status"] == "failed" and out[1]["error"] == "picky: two is bad"
    assert out[1]["error_kind"] == "bad_parameter" and out[3] is rows[3] and Picky.calls == 1
    assert out[0]["timings"]["picky"] >= 0 and "timings" not in rows[0]


def test_local_loop_batches_across_images_and_keeps_order():
    graph = StageGraph()
    stages = graph.build_all()
    seen = []
    diffuse = stages[graph.names().index("diffuse")]
    real = diffuse.process_batch
    diffuse.process_batch = lambda rows: seen.append(len(rows)) or real(rows)
    data = [png_bytes(Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8))) for i in range(5)]
    out = list(graph.run_local([{"key": str(i), "bytes": d} for i, d in enumerate(data)], stages))
    assert [r["key"] for r in out] == ["0", "1", "2", "3", "4"] and all(r["status"] == "ok" for r in out)
    assert seen == [5], "the five images went through the network as one batch"


@pytest.mark.slow
def test_a_new_stage_runs_on_ray_data_without_edits(monkeypatch, bicubic_weights, tmp_path):
    """Also: two CPU model actors (the stamp and the diffuse) on a two-core cluster finish (a per-actor runtime_env
    once made this hang)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module
    _with_stamp(monkeypatch, holds_model=True)
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "in" / f"{i}.png")
    assert all("stamped" in r["notes"] for r in _ray_job(tmp_path, bicubic_weights, 3))


def test_small_jobs_pick_the_local_loop_unless_told(monkeypatch, tmp_path):
    from jobs.pipeline import AUTO_LOCAL_MAX, JobConfig, use_local_loop

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = JobConfig("in", "out")
    assert use_local_loop(cfg, 1) and not use_local_loop(cfg, AUTO_LOCAL_MAX + 1)
    assert not use_local_loop(JobConfig("in", "out", local=False), 1)
    assert use_local_loop(JobConfig("in", "out", local=True), 10_000)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster is configured: use it
    assert not use_local_loop(cfg, 1)


def test_cli_flags_cover_every_option_with_the_dataclass_defaults():
    """Issue 11: the CLI's defaults are the options dataclass's, and every option has a flag."""
    from dataclasses import fields

    from jobs.upscale import config_from_args
    from pidray.cli import build_parser
    from pipeline.stages import UpscaleOptions

    parser = build_parser()
    upscale = parser._subparsers._group_actions[0].choices["upscale"]
    dests = {a.dest for a in upscale._actions}
    missing = [f.name for f in fields(UpscaleOptions) if f.name not in dests and f"no_{f.name}" not in dests]
    assert missing == []
    assert config_from_args(parser.parse_args(["upscale", "in", "out"])).options == UpscaleOptions()


def test_a_job_ended_by_an_error_still_writes_one_row_per_input(monkeypatch, bicubic_weights, tmp_path):
    """An error no row envelope catches (here SystemExit from a stage) ends the job; its manifest is written with
    the finished rows and every other input marked interrupted."""
    from jobs.manifest import read_manifest
    from jobs.pipeline import JobConfig, run_job
    from pipeline.runtime import ModelOptions
    from pipeline.storage import Location

    class Boom:
        def process(self, row):
            if row["key"] == "2.png":
                raise SystemExit("the machine is going away")
            return row

    original = StageGraph.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.stages.insert(0, StageSpec("boom", Boom, {}, False, False))

    monkeypatch.setattr(StageGraph, "__init__", init)
    (tmp_path / "in").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "in" / f"{i}.png")
    cfg = JobConfig(str(tmp_path / "in"), str(tmp_path / "out"), ModelOptions(weights=bicubic_weights), local=True,
                    progress=False)  # fmt: skip
    with pytest.raises(SystemExit):
        run_job(cfg)
    rows = {r["key"]: r["status"] for r in read_manifest(Location(str(tmp_path / "out")))}
    assert set(rows) == {"0.png", "1.png", "2.png", "3.png"} and set(rows.values()) == {"interrupted"}


class WhereAmI:
    """A stage that notes which GPUs its worker may see."""

    def process(self, row):
        import os

        return {**row, "notes": [*row.get("notes", []), f"cuda={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"]}


def test_resources_come_from_the_graph_declaration():
    """Issue 12 (3): every stage's Ray resources come from its declaration; on a cluster with GPUs a stage that
    takes none has CUDA hidden, GPU stages share each card by their declared fractions (which add up to one)."""
    from pipeline.runtime import ModelOptions

    graph = StageGraph(ModelOptions(preset="flux-2k"))
    on_gpus = {s.name: s.ray_options(8) for s in graph.stages}
    assert on_gpus["encode"]["num_gpus"] == 0.25 and on_gpus["diffuse"]["num_gpus"] == 0.75
    assert graph["diffuse"].kwargs["gpu_share"] == 0.75  # the stage budgets its memory from the same number
    for name in ("decode", "merge"):
        assert on_gpus[name]["num_gpus"] == 0
        assert on_gpus[name]["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    assert all("runtime_env" not in s.ray_options(0) and s.ray_options(0)["num_gpus"] == 0 for s in graph.stages)


@pytest.mark.slow
def test_cpu_stages_do_not_see_the_gpu_on_ray_data(monkeypatch, bicubic_weights, tmp_path):
    """On a cluster that has a GPU (a logical one here), a CPU stage's worker runs with CUDA hidden."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _insert_before_diffuse(monkeypatch, StageSpec("where", WhereAmI, {}, False, False))
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    (row,) = _ray_job(tmp_path, bicubic_weights, 1, num_gpus=1)
    notes = row["notes"] if isinstance(row["notes"], list) else str(row["notes"]).split("; ")
    assert "cuda=" in notes and not any(n.startswith("cuda=") and n != "cuda=" for n in notes), notes
