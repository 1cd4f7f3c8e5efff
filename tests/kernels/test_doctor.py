"""The device check (`pidray doctor --gpu`, `python -m pipeline.doctor`): FLOP count, and the --smoke run with Ray,
boto3 and FastAPI unimportable, as on the GPU machines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import doctor
from pipeline.model.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "boto3", "botocore", "fastapi", "starlette", "jobs", "serve", "moto"):
            raise ImportError(f"{name} is not on the GPU machines")
sys.meta_path.insert(0, _Block())
"""


def test_flop_count_of_the_released_network():
    cfg = get_preset("flux-2k").config
    f2k = doctor.forward_flops(cfg, 2048, 2048, 300)
    f4k = doctor.forward_flops(cfg, 3840, 3840, 300)
    params = 1.36e9
    # ~2 FLOPs per parameter per patch token (16384 tokens) is the floor; attention adds more at 4K
    assert 2 * params * 16384 * 0.8 < f2k < 2 * params * 16384 * 4
    assert f4k / f2k > (3840 / 2048) ** 2  # attention grows faster than the pixel count
    print(f"forward FLOPs: 2048² {f2k / 1e12:.1f} TFLOP, 3840² {f4k / 1e12:.1f} TFLOP")


def test_doctor_smoke_runs_without_ray_boto3_fastapi(tmp_path, golden_dir):
    """Every step runs on the CPU with the tiny config; the report is written; nothing outside pipeline/ imported."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "TRITON_INTERPRET": "1"}
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
