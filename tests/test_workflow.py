"""One typed workflow resolved once; drivers that only iterate it; serve/ without an import circle.

These read the source (AST) for what no driver may do, and count preset look-ups where a request or job enters."""

import ast
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.model.presets as presets_module
import pipeline.workflow as workflow_module
from pipeline.graph import StageGraph, upscale_bytes
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.workflow import WORKFLOWS, resolve_workflow

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "jobs", "serve", "pidray")
# the job's driver is jobs/pipeline.py with its in-process loop (jobs/loop.py) and Ray Data adapters and feed
DRIVERS = ["pipeline/graph.py", "jobs/pipeline.py", "jobs/loop.py", "jobs/raydata.py", "jobs/feed.py",
           *(str(p.relative_to(ROOT)) for p in (ROOT / "serve").glob("*.py"))]  # fmt: skip


def _sources(paths):
    for p in paths:
        path = ROOT / p
        yield p, ast.parse(path.read_text(), str(path))


def _all_modules():
    return [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _docstrings(tree) -> set[int]:
    """ids of the Constant nodes that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _names_in(node) -> set[str]:
    """The string constants a comparison operand holds: itself, or the items of a tuple/list/set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_no_module_outside_the_workflows_compares_a_workflow_name():
    """A workflow's differences live in its class: no driver, stage or front end branches on its name."""
    hits = []
    for path, tree in _sources(m for m in _all_modules() if m != "pipeline/workflow.py"):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            text = " ".join(ast.unparse(o) for o in operands)
            named = set().union(*(_names_in(o) for o in operands)) & set(WORKFLOWS)
            if named and ("workflow" in text or "wf" in text.split(".")[0]):
                hits.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not hits, hits


def test_drivers_and_serve_name_no_stage():
    """The local loop, Ray Data and Serve iterate the stage specs: no stage name appears in them as a string (a
    workflow named where a route resolves its workflow is not a stage)."""
    stage_names = {"read", "write"}.union(*({s.name for s in _stages_of(name)} for name in WORKFLOWS))
    assert {"decode", "encode", "diffuse", "merge", "latent", "generate"} <= stage_names
    hits = []
    for path, tree in _sources(DRIVERS):
        docs = _docstrings(tree)
        allowed = set()
        for node in ast.walk(tree):  # a workflow resolved by name; a row's field; the HTTP body's field name
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "resolve_workflow" and node.args:
                allowed.add(id(node.args[0]))
            if isinstance(node, ast.Subscript):
                allowed.add(id(node.slice))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "read_image":
                allowed |= {id(a) for a in node.args}
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "openapi_doc":  # its body's field
                allowed |= {id(a) for a in node.args}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in stage_names and id(node) not in docs | allowed:
                hits.append(f"{path}:{node.lineno}: {node.value!r}")
    assert not hits, hits


def _stages_of(name: str):
    from pipeline.t2i import GenerateOptions

    model = ModelOptions("pixeldit-2k") if name == "generate" else ModelOptions()
    up = ModelOptions() if name == "generate" else None
    wf = resolve_workflow(name, model, UpscaleOptions(), gen=GenerateOptions(), upscale=up)
    return wf.stages()


def test_every_stage_of_every_workflow_has_its_timing_column_in_the_manifest():
    """A stage added to a workflow without its manifest column would lose its timings silently: not silently."""
    from jobs.manifest import SCHEMA, STAGES

    for name in WORKFLOWS:
        for spec in _stages_of(name):
            assert spec.name in STAGES and f"t_{spec.name}" in SCHEMA.names, (name, spec.name)
    assert {"read", "write"} <= set(STAGES)


def test_no_module_outside_the_workflows_compares_what_rows_enter_as():
    """What a workflow's rows are (images, latents, prompt lines) is asked of its class (`reads_images`,
    `reads_latents`, `takes_prompts`), never compared as a word."""
    words = {"images", "latents", "prompts"}
    hits = []
    for path, tree in _sources(m for m in _all_modules() if m != "pipeline/workflow.py"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Constant) and o.value in words for o in operands) and any(
                    "enter" in ast.unparse(o) for o in operands
                ):
                    hits.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not hits, hits


def test_the_default_names_are_written_once():
    """The default workflow and generate-then-decode's default model: one constant each, in pipeline/workflow.py."""
    for value in (workflow_module.DEFAULT_WORKFLOW, workflow_module.DEFAULT_LDM):
        hits = []
        for path, tree in _sources(_all_modules()):
            docs = _docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.arguments):  # a parameter's default
                    for d in [*node.defaults, *node.kw_defaults]:
                        if isinstance(d, ast.Constant) and d.value == value and "workflow" in ast.unparse(node):
                            hits.append(f"{path}:{d.lineno}")
                if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):  # `x or "zimage-turbo"`
                    last = node.values[-1]
                    if isinstance(last, ast.Constant) and last.value == value and id(last) not in docs:
                        hits.append(f"{path}:{last.lineno}")
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) == 3:
                    d = node.args[2]  # getattr(cfg, "workflow", "upscale")
                    if isinstance(d, ast.Constant) and d.value == value:
                        hits.append(f"{path}:{d.lineno}")
        assert not hits, (value, hits)


def _png(hw=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def lookups(monkeypatch):
    """Counts preset look-ups by name, wherever they are called from."""
    calls = []
    real = presets_module.get_preset

    def counted(name):
        calls.append(name)
        return real(name)

    for module in (presets_module, workflow_module):
        monkeypatch.setattr(module, "get_preset", counted)
    return calls


def test_the_python_api_looks_its_preset_up_once(lookups):
    row = upscale_bytes(_png(), ModelOptions(device="cpu"), UpscaleOptions(seed=1))
    assert row["status"] == "ok", row.get("error")
    assert lookups == ["small"]


def test_stages_never_look_a_preset_up(lookups):
    """Built and run, the stages take the workflow's Preset object: not one look-up after the workflow is resolved,
    and the rows carry the TilePlan object from encode to merge (recorded as data only when the row leaves)."""
    graph = StageGraph(ModelOptions(device="cpu"), UpscaleOptions(seed=2))
    assert lookups == ["small"]
    stages = graph.build_all()
    decode, encode = stages[0], stages[1]
    (mid,) = encode.process_batch([decode.process(graph.workflow.enter({"key": "a", "bytes": _png()}))])
    from pipeline.options import Resolved
    from pipeline.tiling import TilePlan

    assert isinstance(mid["plan"], TilePlan) and isinstance(mid["opts"], Resolved)
    with pytest.raises(TypeError, match="did not enter through its workflow"):  # no stage resolves options itself
        encode.process_batch([decode.process({"key": "x", "bytes": _png()})])
    rows = list(graph.run_local([{"key": "b", "bytes": _png()}, {"key": "c", "bytes": _png((9, 40))}], stages))
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    assert isinstance(rows[0]["plan"], dict) and rows[1]["plan"]["in_hw"] in ([9, 40], (9, 40))
    assert lookups == ["small"]


def test_the_endpoint_builder_resolves_each_model_once(lookups):
    """build_app for a VAE preset (upscale and decode routes, encode and diffuse deployments): one look-up."""
    from serve.app import build_app

    build_app({"preset": "flux-2k", "gpu": False})
    assert lookups == ["flux-2k"]


def test_preset_files_are_read_once_per_version(tmp_path, monkeypatch):
    """A preset file is parsed once while it is unchanged, anew when it changes; the cache stays bounded."""
    real = presets_module.get_preset("small")
    path = tmp_path / "mine.json"
    path.write_text(__import__("json").dumps(real.describe()))
    reads = []
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or original(self, *a, **k))
    a, b = presets_module.get_preset(str(path)), presets_module.get_preset(str(path))
    assert a is b and len(reads) == 1
    d = real.describe()
    d["notes"] = "changed, and longer than before"
    path.write_text(__import__("json").dumps(d))
    assert presets_module.get_preset(str(path)).notes == d["notes"] and len(reads) == 2
    for i in range(presets_module.PRESET_FILES_KEPT + 4):
        other = tmp_path / f"p{i}.json"
        other.write_text(__import__("json").dumps(real.describe()))
        presets_module.get_preset(str(other))
    assert len(presets_module._FILES) <= presets_module.PRESET_FILES_KEPT
    for bad, message in (("[1, 2]", "a JSON object"), ("{", "not JSON"), ("{}", "not a valid preset")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            presets_module.get_preset(str(path))


def _imports(path: Path, package: str) -> set[str]:
    """The modules of `package` a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == package}
    return out


def test_serve_has_no_import_circle():
    """serve/ modules import each other one way only (serve.run reaches serve.app, which never imports it back)."""
    graph = {f"serve.{p.stem}": _imports(p, "serve") for p in (ROOT / "serve").glob("*.py")}
    assert "serve.run" not in set().union(*graph.values())

    def visit(mod, path):
        assert mod not in path, " -> ".join([*path, mod])
        for dep in graph.get(mod, ()):
            visit(dep, [*path, mod])

    for mod in graph:
        visit(mod, [])


def test_exit_codes_come_from_the_kind_table(tmp_path, capsys):
    """A user's error exits 2 and a finished job with failed inputs 3, both from pipeline.errors.EXIT_CODE."""
    from pidray.cli import main
    from pipeline.errors import EXIT_CODE, exit_code

    assert exit_code("bad_parameter") == exit_code("setup") == 2 and exit_code("internal") == 1
    assert exit_code("forbidden") == 2 and EXIT_CODE["rows_failed"] == 3
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "good.png").write_bytes(_png())
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(["upscale", str(src), str(dst), "--local", "--no-progress"]) == EXIT_CODE["rows_failed"]
    assert main(["upscale", str(src), str(tmp_path / "o2"), "--steps", "0"]) == EXIT_CODE["bad_parameter"]
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_batch_settings_reach_the_running_replicas():
    """A stage deployment's batch settings come from its user_config (Serve's `reconfigure`): given at start, then
    changed on a running app, the diffuse replica batches by the new ones and still answers."""
    import ray
    import requests
    from ray import serve

    from serve.app import build_app
    from serve.run import start

    from conftest import free_port, wait_healthy

    args = {"preset": "small", "deployments": {"diffuse": {"user_config": {"max_batch_tiles": 8}}}}
    url = start(args, port=free_port(), num_cpus=2)
    try:
        wait_healthy(url, 240)
        diffuse = serve.get_deployment_handle("diffuse", app_name="pidray")
        assert diffuse.settings.remote().result(timeout_s=30) == {"max_batch_tiles": 8, "batch_wait_s": 0.0}
        args["deployments"]["diffuse"]["user_config"] = {"max_batch_tiles": 24, "batch_wait_s": 0.01}
        serve.run(build_app({"bind_host": "127.0.0.1", **args}), name="pidray", route_prefix="/", blocking=False)
        deadline = time.time() + 120
        while time.time() < deadline:
            got = diffuse.settings.remote().result(timeout_s=30)
            if got["max_batch_tiles"] == 24:
                break
            time.sleep(1)
        assert got == {"max_batch_tiles": 24, "batch_wait_s": 0.01}, got
        wait_healthy(url, 120)
        r = requests.post(url + "/v1/upscale", data=_png((16, 16)), headers={"Content-Type": "image/png"}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        serve.shutdown()
        ray.shutdown()
