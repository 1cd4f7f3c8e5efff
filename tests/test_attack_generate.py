"""Attacks on the input paths of generate-then-decode (commit 6ed554b): /v1/generate's `with` and `stop_at`, an
endpoint's generate={"with", "options", "offload"}, `pidray serve|generate --with`, `--with NAME=DIR`, a prompt
file's declared fields, `pidray generate`'s declared arguments and pidray.data.decode's cells. Each bad input is
refused in one line (a 4xx, exit 2, a refusal at start-up, or its own line or row failed with the reason), never a
traceback, a 500, a file read on the server or unbounded memory. The endpoint tests are slow (one Serve app)."""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import BadParameter, PidrayError, SetupError

from conftest import ROOT, free_port, make_tiny_zimage, wait_healthy

FLUX = "flux-2kto4k-v1.5"  # a PiD preset that decodes Z-Image's latents (nothing loads: presets are looked up only)
ZIMAGE_INDEX = json.dumps({"_class_name": "ZImagePipeline"})


def _one_line(err: BaseException, what: str) -> None:
    msg = str(err)
    assert not isinstance(err, (TypeError, OSError, RuntimeError, ArithmeticError, LookupError, RecursionError)), msg
    assert what in msg and "\n" not in msg and len(msg) < 400, msg[:500]


# ---------------------------------------------------------------------------- an endpoint's generate= configuration
@pytest.mark.parametrize(
    "generate, what",
    [
        ({"with": "zimage", "options": []}, "generate.options"),
        ({"with": "zimage", "options": {"size": ["a", 16]}}, "size"),
        ({"with": "zimage", "options": {"size": [1024.7, 1024]}}, "size"),
        ({"with": "zimage", "options": {"size": ["1024", "1024"]}}, "size"),
        ({"with": "zimage", "options": {"size": [float("inf"), 16]}}, "size"),
        ({"with": "zimage", "options": {"stop_at": 0}}, "stop_at must be an integer in 1..200"),
        ({"with": "zimage", "preset": "pixeldit-2k"}, "got ['preset', 'with']"),
        ({"with": "zimage", "offload": "yes"}, "offload (true/false)"),
        ({"with": ["zimage"]}, "with (a name or a diffusers folder)"),
        ({"with": "~no-such-user/zimage"}, "~no-such-user"),
        ({"with": "x" * 100_000}, "not a generator"),
        ({"preset": "pixeldit-2k", "options": {"stop_at": 2}}, "stop_at is for a generator"),  # was taken, ignored
    ],
)  # fmt: skip
def test_a_bad_generate_config_is_refused_at_start_up(generate, what):
    from serve.builder import AppArgs, served_workflows

    with pytest.raises((ValueError, PidrayError)) as e:
        served_workflows(AppArgs.model_validate({"preset": FLUX, "generate": generate}))
    _one_line(e.value, what)


def test_a_pixeldit_endpoint_refuses_with_and_stop_at():
    from serve.params import ServedGenerator

    for asked, stop in (("zimage", None), (None, 2), ("", None), ("/etc", 1)):
        with pytest.raises(BadParameter, match="generates with its text-to-image preset"):
            ServedGenerator().check(asked, stop)
    assert ServedGenerator().check(None, None) is None


# ---------------------------------------------------------------------------- --with NAME, DIR, NAME=DIR
def _folder(root, name, index=None, link=None, fifo=False):
    d = root / name
    d.mkdir()
    f = d / "model_index.json"
    if fifo:
        os.mkfifo(f)
    elif link:
        os.symlink(link, f)
    else:
        f.write_text(index)
    return str(d)


def test_with_folders_that_lie_fail_in_one_line_before_anything_loads(tmp_path, monkeypatch):
    from pipeline.generators import generator_spec

    monkeypatch.chdir(tmp_path)
    good = _folder(tmp_path, "good", ZIMAGE_INDEX)
    comp = lambda **c: json.dumps({"_class_name": "ZImagePipeline", **c})  # noqa: E731
    bad = {
        _folder(tmp_path, "fifo", fifo=True): "not a regular file",
        _folder(tmp_path, "zero", link="/dev/zero"): "not a regular file",
        _folder(tmp_path, "big", " " * (2 << 20)): "over 1,048,576 bytes",
        _folder(tmp_path, "text", "hello"): "not readable",
        _folder(tmp_path, "deep", "[" * 100_000 + "]" * 100_000): "not readable",
        _folder(tmp_path, "empty", comp(transformer=[])): "component 'transformer'",
        _folder(tmp_path, "long", comp(transformer=["diffusers", "x\n" * 100_000])): "component 'transformer'",
        _folder(tmp_path, "key", json.dumps({"_class_name": "ZImagePipeline", "t" * 100_000: ["a", "b"]})): "ttt",
        f"{good}/model_index.json": "a file, not a diffusers folder",
        "~no-such-user/zimage": "~no-such-user",
        "x" * 100_000: "not a generator",
        "zimage=": "NAME=DIR needs a folder after '='",
        f"={good}": "NAME=DIR needs a generator name before '='",
        "zimage=zimage-turbo": "NAME=DIR needs a folder",  # a hub name under another's settings
        f"zimage-turbo=zimage={good}": "not a diffusers folder",  # nested: the part after the first '=' is a folder
        f"sdxl={good}": "holds a ZImagePipeline, not sdxl's",
    }  # fmt: skip
    for spec, what in bad.items():
        with pytest.raises(SetupError) as e:
            generator_spec(spec)
        _one_line(e.value, what)
    eq = tmp_path / "run=3"
    eq.mkdir()
    (eq / "model_index.json").write_text(ZIMAGE_INDEX)
    linked = _folder(tmp_path, "linked", link=f"{good}/model_index.json")
    assert generator_spec(str(eq)) == (generator_spec("zimage")[0], str(eq))  # '=' in a folder's name
    assert generator_spec(f"zimage-turbo={eq}")[0].name == "zimage-turbo"
    assert generator_spec("run=3")[0].name == "zimage"  # relative, not a generator's name before '='
    assert generator_spec(linked)[1] == linked


# ---------------------------------------------------------------------------- the CLI: declared arguments, --with
@pytest.mark.parametrize(
    "argv, what",
    [
        (["--size", "0x0"], "sizes must be positive"),
        (["--size", "1e9x2"], "size must be WIDTHxHEIGHT"),
        (["--steps", "-1"], "steps must be an integer in 2..200"),
        (["--with", "zimage", "--stop-at", "0"], "stop_at must be an integer in 1..200"),
        (["--seed", "-1"], "seed must be an integer"),
        (["--cfg-scale", "nan"], "cfg_scale must be in [0, 50]"),
        (["--with", "~no-such-user/x"], "~no-such-user"),
        (["--with="], "--with needs a generator"),
        (["--with", "zimage="], "NAME=DIR needs a folder"),
    ],
)  # fmt: skip
def test_generate_arguments_fail_in_one_line_with_exit_2(argv, what, tmp_path, capsys):
    from pidray.cli import main

    out = tmp_path / "out.png"
    try:
        rc = main(["generate", "a cat", str(out), *argv])
    except SystemExit as e:  # argparse's own refusal: its usage line, then the error
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists(), err
    assert err[-1].startswith("pidray generate: error:") and what in err[-1] and len(err) <= 2, err


def test_serve_with_an_empty_generator_is_refused_before_ray_starts():
    r = subprocess.run([sys.executable, "-m", "pidray.cli", "serve", "--port", str(free_port()), "--with="],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip() == "pidray serve: error: --with needs a generator name or a folder"


def test_generate_help_imports_no_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pidray.cli", "generate", "--help"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--stop-at" in r.stdout
    assert not [line for line in r.stderr.splitlines() if "torch" in line]


# ---------------------------------------------------------------------------- a prompt file's fields
def _plan(tmp_path, name: str, text: str, workflow: str, ldm=None, preset=FLUX):
    from jobs.config import JobConfig
    from jobs.plan import plan_job
    from pipeline.runtime import ModelOptions

    (tmp_path / name).write_text(text)
    cfg = JobConfig(src=str(tmp_path / name), dst=str(tmp_path / f"out-{workflow}-{name}"),
                    model=ModelOptions(preset), workflow=workflow, ldm=ldm)  # fmt: skip
    plan = plan_job(cfg)
    errors = {int(r["key"].rsplit(":", 1)[1]): r["error"] for r in plan.rejected}
    return sorted(int(r["key"].rsplit(":", 1)[1]) for r in plan.todo), errors


JSONL = ['{"prompt": "fine"}', '{"prompt": "a", "stop_at": "2"}', '{"prompt": "a", "stop_at": 1e400}',
         '{"prompt": "a", "stop_at": true}', '{"prompt": "a", "stop_at": {"k": 1}}', '{"prompt": "a", "stop_at": 0}',
         '{"prompt": "a", "stop_at": 60}', '{"prompt": "a", "stop_at": 3}', '{"prompt": "a", "size": [1024.0, 1024]}',
         '{"prompt": "a", "size": [true, 1024]}', '{"prompt": "a", "steps": 2, "stop_at": 3}']  # fmt: skip
WHY = {2: "stop_at must be a whole number, got '2'", 3: "stop_at must be a whole number, got inf",
       4: "stop_at must be a whole number, got True", 5: "stop_at must be a whole number, got {'k': 1}",
       6: "stop_at must be an integer in 1..200, got 0", 7: "stop_at 60 is past the last of the generator's 50 steps",
       9: "size must be a whole number, got 1024.0", 10: "size must be a whole number, got True",
       11: "stop_at 3 is past the last of the generator's 2 steps"}  # fmt: skip


def test_bad_prompt_lines_fail_alone_with_and_without_a_generator(tmp_path):
    todo, errors = _plan(tmp_path, "p.jsonl", "\n".join(JSONL), "ldm", "zimage")
    assert todo == [1, 8] and sorted(errors) == sorted(WHY)
    for n, why in WHY.items():
        assert errors[n].startswith(f"plan: line {n}: ") and why in errors[n], errors[n]
    todo, errors = _plan(tmp_path, "p.jsonl", "\n".join(JSONL), "generate", preset="pixeldit-2k")
    assert todo == [1]  # PixelDiT: every stop_at fails its line
    for n in (6, 7, 8, 11):
        assert "stop_at is for a generator's latent" in errors[n], errors[n]
    csv = "prompt,stop_at,steps,cfg_scale\nfine,,,\na,2,,\na,1e400,,\na,true,,\na,,\u0663,\na,,,1_0\n"
    todo, errors = _plan(tmp_path, "p.csv", csv, "ldm", "zimage")
    assert todo == [2, 3] and sorted(errors) == [4, 5, 6, 7]
    assert "stop_at must be a whole number, got '1e400'" in errors[4] and "got 'true'" in errors[5]
    assert "steps must be a whole number" in errors[6] and "cfg_scale must be a finite number" in errors[7]


# ---------------------------------------------------------------------------- pidray.data.decode's cells
def _npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _latent_cells() -> dict:
    from safetensors.numpy import save as st_save

    good = _npy(np.random.default_rng(0).standard_normal((16, 4, 3)).astype(np.float32))
    st = st_save({"z": np.zeros((16, 4, 3), np.float32)})
    n = struct.unpack("<Q", st[:8])[0]
    head = json.loads(st[8 : 8 + n])
    head["z"]["shape"] = [16, 100_000, 100_000]
    lie = json.dumps(head).encode()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("z.npy", _npy(np.zeros((16, 1024, 1024), np.float32)))  # 64 MiB inflated, 64 kB sent
    return {
        "good": (good, None),
        "npy-lies": (good.replace(b"(16, 4, 3)", b"(16, 99999, 99999)"), "over the limit"),
        "zip-bomb": (bomb.getvalue(), "over the limit"),
        "st-header": (struct.pack("<Q", 1 << 60) + b'{"z": 1}', "safetensors header is"),
        "st-lies": (struct.pack("<Q", len(lie)) + lie + st[8 + n :], "over the limit"),
        "truncated": (good[: len(good) // 2], "claims 768 bytes"),
        "empty": (b"", "not a latent file"),
        "null": (None, "the 'latent' cell is null"),
    }


def _through_latent_stage(table: pa.Table, **kw) -> list[dict]:
    """Rows as pidray.data's entry makes them of `table` (one call per row, as Ray would fail a whole call), then
    through the decode workflow's first stage (the latent files read, nothing loads)."""
    from pidray.data import _enter
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions
    from pipeline.stages.common import run_stage
    from pipeline.workflow import resolve_workflow

    flow = resolve_workflow("decode", ModelOptions("flux-2k"), UpscaleOptions())
    latent = StageGraph(workflow=flow).stages[0].build()
    args = {"workflow": flow, "image_column": "latent", "layout": "binary", "caption_column": None,
            "key_column": "id", "sigma_column": "sigma", "latents": True, **kw}  # fmt: skip
    out = _enter(table, **args)
    return [run_stage(latent, "latent", [pickle.loads(b)])[0] for b in out["row"]]


def test_lying_latent_cells_fail_alone_in_bounded_memory():
    cells = _latent_cells()
    table = pa.table({"id": list(cells), "latent": pa.array([c for c, _ in cells.values()], pa.binary()),
                      "sigma": pa.array([None] * len(cells), pa.float64())})  # fmt: skip
    tracemalloc.start()
    try:
        rows = _through_latent_stage(table)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak >> 20} MiB"
    for (name, (_, why)), r in zip(cells.items(), rows):
        if why is None:
            assert r.get("status") != "failed" and "latent" in r, r.get("error")
        else:
            assert r["status"] == "failed" and why in r["error"] and "\n" not in r["error"], (name, r["error"])


def test_sigmas_keys_and_cells_of_any_type_fail_their_row_alone():
    """Sigma NaN/inf/negative/text/list, keys that repeat or hold '#', '/' or nothing, a null struct, a struct where
    binary was expected and text cells (a dataset of pandas blocks has no Arrow types to check up front)."""
    good = _npy(np.zeros((16, 4, 3), np.float32))
    sigmas = [float("nan"), float("inf"), -1.0, 0.5, None]
    rows = _through_latent_stage(pa.table({"id": list("abcde"), "latent": [good] * 5, "sigma": sigmas}))
    assert [r.get("status", "ok") for r in rows] == ["failed"] * 3 + ["ok"] * 2
    assert all("sigma must be a number >= 0" in r["error"] for r in rows[:3])
    texts = ["0.5", "abc", "1e400", None]
    rows = _through_latent_stage(pa.table({"id": list("abcd"), "latent": [good] * 4, "sigma": texts}))
    assert [r.get("status", "ok") for r in rows] == ["failed", "failed", "failed", "ok"]  # text is no number
    assert "sigma must be a number >= 0, got 'abc'" in rows[1]["error"]
    rows = _through_latent_stage(pa.table({"id": ["a"], "latent": [good], "sigma": [[0.5]]}))
    assert rows[0]["status"] == "failed" and "sigma must be a number" in rows[0]["error"]
    keys = ["dup", "dup", "a#b", "x/y/../z", "", "dir/", "/etc/passwd", ".."]
    rows = _through_latent_stage(pa.table({"id": keys, "latent": [good] * len(keys),
                                           "sigma": pa.array([None] * len(keys), pa.float64())}))  # fmt: skip
    assert all(r.get("status") != "failed" for r in rows), [r.get("error") for r in rows]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = pa.array([{"bytes": good, "path": "x.npy"}, None, {"bytes": None, "path": "y"}], image)
    for layout in ("struct", "binary"):  # "binary": the dataset's schema did not say
        rows = _through_latent_stage(pa.table({"id": list("abc"), "latent": cells, "sigma": [None] * 3}),
                                     layout=layout)  # fmt: skip
        assert [r.get("status", "ok") for r in rows] == ["ok", "failed", "failed"]
        assert all("the 'latent' cell is null" in r["error"] for r in rows[1:])
    rows = _through_latent_stage(pa.table({"latent": ["abc", "\x93NUMPY"], "sigma": [None] * 2}), key_column=None)
    assert all(r["status"] == "failed" and "the 'latent' cell is str, not bytes" in r["error"] for r in rows)


# ---------------------------------------------------------------------------- /v1/generate over HTTP (slow)
@pytest.fixture(scope="module")
def app(tmp_path_factory, golden_dir):
    pytest.importorskip("diffusers")
    import ray
    from ray import serve
    from test_encoders import build_stand_in

    from serve.run import start

    d = tmp_path_factory.mktemp("attack")
    build_stand_in("flux-2k", golden_dir, d / "flux")
    other = d / "other"  # a folder on the server a client names: were it read, its FIFO would hang the request
    other.mkdir()
    os.mkfifo(other / "model_index.json")
    args = {
        "preset": str(d / "flux" / "preset.json"),
        "weights": str(d / "flux"),
        "options": {"overlap": 1},
        "max_cost_mpx_steps": 4,
        "generate": {
            "with": str(make_tiny_zimage(d / "zimage")),
            "options": {"steps": 3, "cfg_scale": 0.0, "size": [64, 48]},
        },
    }
    url = start(args, port=free_port(), num_cpus=2)
    wait_healthy(url, 300)
    yield url, str(other)
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow
def test_hostile_generate_requests_get_a_4xx_in_one_line(app):
    import requests

    url, other = app
    bodies = [
        ('{"prompt": "a", "with": []}', 422, "with must be a string"),
        ('{"prompt": "a", "with": 1e400}', 422, "with must be a string"),
        (json.dumps({"prompt": "a", "with": "x" * 100_000}), 413, "with is 100,000 characters"),
        ('{"prompt": "a", "with": "/etc/passwd"}', 422, "not '/etc/passwd'"),
        ('{"prompt": "a", "with": "../x"}', 422, "not '../x'"),
        (json.dumps({"prompt": "a", "with": other}), 422, "each endpoint serves one generator"),
        ('{"prompt": "a", "with": "\\ud800"}', 422, "with is not valid text"),
        ('{"prompt": "a", "stop_at": 0}', 422, "stop_at must be an integer in 1..200, got 0"),
        ('{"prompt": "a", "stop_at": -1}', 422, "stop_at must be an integer in 1..200, got -1"),
        ('{"prompt": "a", "stop_at": "2"}', 422, "stop_at must be an integer"),
        ('{"prompt": "a", "stop_at": 2.0}', 422, "stop_at must be an integer"),
        ('{"prompt": "a", "stop_at": 3, "steps": 2}', 422, "stop_at 3 is past the last of the generator's 2 steps"),
        ('{"prompt": "a", "size": [48.0, 64]}', 422, "size must be"),
    ]
    for body, status, why in bodies:
        r = requests.post(url + "/v1/generate", data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (body[:80], r.text[:300])
        err = r.json()["error"]
        assert why in err and "\n" not in err and len(err) < 400 and "Traceback" not in r.text, (body[:80], err)
