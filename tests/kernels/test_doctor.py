"""The device check (`pidray doctor --gpu`, `python -m pipeline.doctor`): FLOP count, the plan, per-item guards, the
golden fixtures' folder, and the --smoke run with everything the GPU machines lack made unimportable."""

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pipeline import doctor
from pipeline.model.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
# What the GPU machines have besides python 3.12: these distributions and what they require.
DEVICE = ("torch", "triton", "numpy", "pillow", "safetensors", "pyarrow", "transformers")
# Our packages outside pipeline/: the doctor runs from pipeline/ alone.
OURS = ("jobs", "serve", "pidray")
# Run first in the child Python: site-packages swapped for a copy made of links to what the device has, our tree for
# one holding pipeline/ alone, and the editable install's finder dropped. Missing modules are then missing the way
# they are on the device (`find_spec` says None, an import raises ModuleNotFoundError, no metadata).
DEVICE_SITE = """
import os, sys
REAL, SHADOW, TREE = {real!r}, {shadow!r}, {tree!r}
sys.path[:] = [SHADOW if os.path.realpath(p) == REAL else p for p in sys.path
               if not p.startswith("__editable__") and os.path.realpath(p or ".") != TREE]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
"""


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots) -> set[str]:
    """Distributions (canonical names) that `roots` ("name" or "name[extra,...]") bring, by their metadata."""
    seen, todo = set(), [(r, ()) for r in roots]
    while todo:
        spec, extras = todo.pop()
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
        name = _canon(m.group(1))
        extras = tuple(extras) + tuple(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
        if (name, extras) in seen or name in seen and not extras:
            continue
        seen.add(name)
        seen.add((name, extras))
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in reqs:
            req, _, marker = r.partition(";")
            wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if wanted and not set(wanted) & set(extras):
                continue
            todo.append((req, ()))
    return {s for s in seen if isinstance(s, str)}


def missing_on_device() -> list[str]:
    """Import names of everything our dependencies (pyproject.toml, extras included) bring that the GPU machines
    lack: our distributions' closure minus the device's, mapped to the top-level modules they install."""
    allowed = _closure(DEVICE)
    lacking = _closure(_ours()) - allowed
    blocked = set(OURS)
    for module, dists in metadata.packages_distributions().items():
        canon = {_canon(d) for d in dists}
        if canon & lacking and not canon & allowed and module.isidentifier():
            blocked.add(module)
    return sorted(blocked)


def device_python(tmp_path: Path) -> dict:
    """The environment of a child Python that sees only what the GPU machines have (see DEVICE_SITE)."""
    import sysconfig

    real = os.path.realpath(sysconfig.get_paths()["purelib"])
    blocked = set(missing_on_device())
    lacking = _closure(_ours()) - _closure(DEVICE)
    shadow, tree = tmp_path / "site-packages", tmp_path / "tree"
    shadow.mkdir()
    tree.mkdir()
    for entry in Path(real).iterdir():
        name = entry.name
        if name.endswith((".dist-info", ".egg-info")):
            if _canon(name.split("-")[0]) in lacking or name.startswith("pidray"):
                continue
        elif name.split(".")[0] in blocked or name.startswith("__editable__"):
            continue
        (shadow / name).symlink_to(entry)
    (tree / "pipeline").symlink_to(ROOT / "pipeline")
    (tmp_path / "sitecustomize.py").write_text(DEVICE_SITE.format(real=real, shadow=str(shadow),
                                                                  tree=os.path.realpath(ROOT)))  # fmt: skip
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{tree}", "TRITON_INTERPRET": "1"}


def _ours() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + [d for ds in project.get("optional-dependencies", {}).values() for d in ds]


def test_the_device_lacks_what_the_issue_names():
    names = missing_on_device()
    print(f"{len(names)} modules made unimportable: {', '.join(names)}")
    for m in ("ray", "boto3", "botocore", "fastapi", "starlette", "moto", "diffusers", "uvicorn", "skimage"):
        assert m in names, m
    for m in ("torch", "triton", "numpy", "PIL", "safetensors", "pyarrow", "transformers"):
        assert m not in names, m


def test_flop_count_of_the_released_network():
    cfg = get_preset("flux-2k").config
    f2k = doctor.forward_flops(cfg, 2048, 2048, 300)
    f4k = doctor.forward_flops(cfg, 3840, 3840, 300)
    params = 1.36e9
    # ~2 FLOPs per parameter per patch token (16384 tokens) is the floor; attention adds more at 4K
    assert 2 * params * 16384 * 0.8 < f2k < 2 * params * 16384 * 4
    assert f4k / f2k > (3840 / 2048) ** 2  # attention grows faster than the pixel count
    print(f"forward FLOPs: 2048² {f2k / 1e12:.1f} TFLOP, 3840² {f4k / 1e12:.1f} TFLOP")


def test_doctor_smoke_runs_with_only_what_the_device_has(tmp_path, golden_dir):
    """Every step runs on the CPU with the tiny config, in a Python where everything the GPU machines lack is
    unimportable (Ray, boto3, FastAPI, moto, diffusers, uvicorn, scikit-image, ... and our packages outside
    pipeline/); the report is written."""
    env = device_python(tmp_path)
    probe = "import importlib.util as u, pipeline; print([m for m in ('ray', 'boto3', 'fastapi', 'diffusers', 'serve', "
    probe += "'jobs', 'pidray', 'skimage', 'scipy', 'torch', 'transformers') if u.find_spec(m)], pipeline.__file__)"
    seen = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert seen.stdout.startswith("['torch', 'transformers']"), seen.stdout + seen.stderr[-2000:]
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.doctor", "--smoke", "--out", str(out), "--golden", str(golden_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "doctor.json").read_text())
    assert set(rep["steps"]) == set(doctor.STEPS)
    assert all(v["status"] == "ok" for v in rep["steps"].values()), {k: v["status"] for k, v in rep["steps"].items()}
    assert "ok" in json.dumps(rep["steps"]["kernels"]["agreement float32"])
    loop = rep["steps"]["diffuse_loop"]
    assert all(0 <= loop[f"32² batch {b}"]["host_share"] < 1 for b in (1, 2, 4))
    golden = rep["steps"]["golden"]
    assert golden["pid_v1_flux.safetensors"]["expected.forward"] <= 1e-4  # the same parity, through `_on`
    assert rep["steps"]["graph"]["small 24² -> 96²"]["psnr_device_vs_cpu_db"] == float("inf")
    assert (out / "doctor.md").read_text().startswith("# pidray doctor")
    bulk = rep["steps"]["bulk"]
    for label in ("flux-2k 16² -> 64²", "flux-2kto4k-v1.5 24² -> 96²"):
        b = bulk[label]
        assert b["images_per_s"] > 0 and 0 < b["busy_share"] <= b["model_busy_share"] <= 1, b
        assert set(b["stage_share"]) == {"decode", "encode", "diffuse", "merge"}
        assert b["cost_per_1000_images"] == pytest.approx(1000 / b["images_per_s"] / 3600 * 3.0, rel=1e-3)
        assert b["peak_gib"] > 0
    assert bulk["flux-2kto4k-v1.5 24² -> 96²"]["tiles_per_image"] == 4


def test_doctor_refuses_unknown_steps(capsys):
    with pytest.raises(SystemExit) as e:
        doctor.main(["--smoke", "--steps", "versions,nope", "--out", ""])
    assert e.value.code == 2 and "unknown step(s) ['nope']" in capsys.readouterr().err


def test_doctor_budget_skips_and_still_reports(tmp_path):
    """A budget too short for a step: it is skipped and said so, the report is still written."""
    ap = __import__("argparse").ArgumentParser()
    doctor.add_args(ap)
    args = ap.parse_args(["--device", "cpu", "--steps", "versions,forward", "--budget", "0", "--out", str(tmp_path)])
    rep = doctor.run(args)
    assert rep["steps"]["forward"]["status"] == "skipped: time budget"
    assert json.loads((tmp_path / "doctor.json").read_text())["steps"]["forward"]["status"].startswith("skipped")


def test_smoke_report_has_the_hot_path_section(tmp_path):
    """`--smoke --out DIR` writes `hot_path` at the top of doctor.json with the goals met."""
    rep = doctor.main(["--smoke", "--steps", "hot_path", "--out", str(tmp_path)])
    assert rep == 0
    hp = json.loads((tmp_path / "doctor.json").read_text())["hot_path"]
    assert hp["host_rng_draws_per_step"] == hp["host_to_device_copies_per_step"] == 0
    assert hp["device_to_host_syncs_per_step"] == 0
    assert set(hp["autotune_key_sets"]) == {"1", "2", "4"} and len(set(hp["autotune_key_sets"].values())) == 1
    assert all(n <= 6 for n in hp["distinct_tile_shapes"].values())


def _args(argv):
    import argparse

    ap = argparse.ArgumentParser()
    doctor.add_args(ap)
    return ap.parse_args(argv)


def test_asked_for_golden_fixtures_that_are_missing_fail_the_step(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "nowhere"):
        rep = doctor.run(_args(["--smoke", "--steps", "golden", "--golden", str(folder), "--out", ""]))
        status = rep["steps"]["golden"]["status"]
        assert status.startswith("error: FileNotFoundError") and str(folder) in status, status
    assert doctor.main(["--smoke", "--steps", "golden", "--golden", str(empty), "--out", ""]) == 1


def test_no_golden_fixtures_anywhere_is_skipped_not_ok(tmp_path, monkeypatch):
    from pipeline.doctor import harness

    monkeypatch.setattr(harness, "golden_places", lambda: [tmp_path / "none"])
    rep = doctor.run(_args(["--smoke", "--steps", "golden", "--out", ""]))
    assert rep["steps"]["golden"]["status"].startswith("skipped: no golden fixtures found"), rep["steps"]["golden"]


def test_golden_fixtures_are_found_beside_the_checkout(golden_dir, monkeypatch, tmp_path):
    """Without --golden, a checkout's fixtures are found in `shared/golden` beside it (where they live here)."""
    from pipeline.doctor.harness import golden_files, golden_places

    monkeypatch.chdir(tmp_path)  # no .gpu/ in the working folder
    assert ROOT.parent / "shared" / "golden" in golden_places()
    found = golden_files(None)
    assert found and found[0].parent.resolve() == golden_dir.resolve(), found


def test_plan_of_the_default_steps_fits_420_s_on_an_h100_correctness_first(capsys):
    from pipeline.doctor.plan import COMPILE_NEED_S, Opts, table

    rows = table(list(doctor.STEPS), "H100", Opts())
    total = sum(r[2] for r in rows)
    assert total <= 420, total
    assert all(need >= sec for _, _, sec, need in rows)
    compiles = [r for r in rows if "compile" in r[1]]
    assert compiles and all(need >= COMPILE_NEED_S for *_, need in compiles)
    order = list(dict.fromkeys(r[0] for r in rows))
    correctness = ["versions", "golden", "kernels", "graph", "precision"]
    assert order[:5] == correctness and order.index("forward") > 4 and order[-1] == "bulk"
    assert doctor.DEFAULT_BUDGET_S + 60 <= 600  # one 600 s call, with room for start-up
    full = sum(r[2] for r in table(list(doctor.STEPS), "H100", Opts(full=True)))
    assert full > total
    # the CLI: every step planned, the total printed
    assert doctor.main(["--plan", "--card", "H100"]) == 0
    out = capsys.readouterr().out
    assert all(s in out for s in doctor.STEPS)
    printed = float(re.search(r"total: (\d+) s", out).group(1))
    assert printed == pytest.approx(total, abs=1) and printed <= 420
    print(out)
    # a front end that runs only `versions` when no step is named (`pidray doctor`) still plans every step
    assert _args(["--plan"]).steps == ",".join(doctor.STEPS)
    assert _args(["--steps", "graph", "--plan"]).steps == _args(["--plan", "--steps", "graph"]).steps == "graph"


def test_an_item_that_raises_costs_only_itself_and_keeps_its_innermost_frames(monkeypatch, tmp_path):
    """FP8 fails: the forward step's eager network and the precision step's other variants still run and report;
    the error names fp8.py's frame."""
    from pipeline.kernels import fp8

    def broken(x, *a, **kw):
        raise RuntimeError("self must be row_major")

    monkeypatch.setattr(fp8.torch, "_scaled_mm", broken)
    args = ["--smoke", "--steps", "forward,precision", "--golden", str(tmp_path), "--out", ""]
    rep = doctor.run(_args(args))
    prec = rep["steps"]["precision"]
    assert prec["status"] == "error: 1 item(s) failed: random weights 32² (fp8)", prec["status"]
    case = prec["random weights 32², depth 2+1"]
    assert case["fp8_rel_err"].startswith("error: RuntimeError") and isinstance(case["autocast_rel_err"], float)
    fwd = rep["steps"]["forward"]
    assert fwd["status"] == "error: 1 item(s) failed: 32² fp8", fwd["status"]
    assert "ms" in fwd["32² eager"]
    err = fwd["32² fp8"]
    assert err["error"] == "RuntimeError: self must be row_major"
    assert 'fp8.py", line' in err["traceback"] and "in forward" in err["traceback"]
    assert "doctor/harness.py" not in err["traceback"]  # the outermost frames are the ones dropped


def test_innermost_keeps_the_frames_where_it_was_raised():
    def deep(n):
        if n == 0:
            raise ValueError("inner")
        return deep(n - 1)

    def outermost():
        try:
            deep(30)
        except ValueError as e:
            raise KeyError("outer") from e

    try:
        outermost()
    except KeyError as e:
        text = doctor.innermost(e, frames=4)
    assert "ValueError: inner" in text and "KeyError: 'outer'" in text
    assert text.count(", in deep") == 4 and ", in outermost" in text  # 4 of deep's 31 frames, the innermost
