"""The bulk job on a real local Ray cluster and a real S3-compatible server (moto, 127.0.0.1) through boto3.

Marked slow: Ray start-up and actor pools dominate. Uses the `small` preset at its bicubic initialisation
(deterministic and fast), since these tests are about the job, not the model.
"""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from jobs.manifest import MANIFEST_NAME, read_manifest
from jobs.pipeline import JobConfig, run_job
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.storage import Location, S3Settings

import corpus
from conftest import S3_CREDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.update(S3_CREDS)  # workers inherit the driver's environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _write_corpus(root: Path, entries) -> None:
    for key, (data, _) in entries.items():
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _check_results(entries, rows, read_output):
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == set(entries), "every input has exactly one manifest row"
    for key, (_, expect) in entries.items():
        r = by_key[key]
        if expect[0] == "fail":
            assert r["status"] == "failed" and re.search(expect[1], r["error"]), (key, r["error"])
            continue
        assert r["status"] == "ok", (key, r["error"])
        img = Image.open(io.BytesIO(read_output(r["output_key"])))
        assert img.size == expect[1], (key, img.size)
        assert (r["out_w"], r["out_h"]) == expect[1]
        if expect[2]:
            assert img.mode == expect[2], (key, img.mode)
        assert r["model"] == "small" and r["seed"] >= 0 and r["t_diffuse"] > 0


def test_folder_to_folder_with_bad_corpus(ray_local, bicubic_weights, tmp_path):
    entries = corpus.build()
    assert len(entries) >= 20
    src, dst = tmp_path / "in", tmp_path / "out"
    _write_corpus(src, entries)
    cfg = JobConfig(
        str(src), str(dst), ModelOptions(weights=bicubic_weights), UpscaleOptions(), progress=False, local=False
    )
    summary = run_job(cfg)
    print(summary.line())
    assert summary.ok + summary.failed == len(entries) and summary.failed == 8
    _check_results(entries, read_manifest(Location(str(dst))), lambda k: (dst / k).read_bytes())
    assert (dst / "nested/deeper/ünïcode ✓ name.png").is_file()
    assert (dst / "odd/jpeg named png.jpg").is_file()  # keeps the real format: JPEG
    assert not list(dst.rglob(".pidray-*"))


def test_s3_to_s3_nested_keys(ray_local, s3_server, bicubic_weights):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="bucket")
    entries = {k: v for k, v in corpus.build().items() if k.startswith(("odd/c", "odd/alpha", "nested", "bad/zero"))}
    for key, (data, _) in entries.items():
        s3.put_object(Bucket="bucket", Key=f"raw/{key}", Body=data)
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    cfg = JobConfig("s3://bucket/raw", "s3://bucket/4k", ModelOptions(weights=bicubic_weights), UpscaleOptions(),
                    s3=settings, progress=False, local=False)  # fmt: skip
    summary = run_job(cfg)
    assert summary.ok == len(entries) - 1 and summary.failed == 1
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="bucket", Prefix="4k/")["Contents"]}
    assert f"4k/{MANIFEST_NAME}" in keys and "4k/nested/deeper/ünïcode ✓ name.png" in keys
    rows = read_manifest(Location("s3://bucket/4k", settings))
    _check_results(entries, rows, lambda k: s3.get_object(Bucket="bucket", Key=f"4k/{k}")["Body"].read())


def _ray_worker_pids(pattern: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if pattern in cmd:
                pids.append(int(proc.name))
    return pids


def test_killing_the_diffuse_actor_loses_nothing(ray_local, bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    entries = {k: v for k, v in corpus.build().items() if v[1][0] == "ok" and "float" not in k}
    _write_corpus(src, entries)
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if any(p.suffix != ".parquet" for p in dst.rglob("*.*") if p.is_file()):
                for pid in _ray_worker_pids("StageActor"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    cfg = JobConfig(
        str(src), str(dst), ModelOptions(weights=bicubic_weights), UpscaleOptions(), progress=False, local=False
    )
    summary = run_job(cfg)
    t.join(timeout=1)
    assert killed, "the test did not manage to kill the actor mid-job"
    assert summary.ok == len(entries) and summary.failed == 0
    outputs = sorted(p for p in dst.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    assert len(outputs) == len(entries) and not list(dst.rglob(".pidray-*"))
    _check_results(entries, read_manifest(Location(str(dst))), lambda k: (dst / k).read_bytes())


def test_resume_after_a_crash_writes_only_missing_outputs(bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    entries = {k: v for k, v in corpus.build().items() if v[1][0] == "ok"}
    _write_corpus(src, entries)
    cmd = [sys.executable, "-m", "pidray.cli", "upscale", str(src), str(dst), "--local", "--weights", bicubic_weights]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len([p for p in dst.rglob("*.*") if p.is_file() and p.name[0] != "."]) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a crash: no manifest, no clean-up
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert 3 <= len(before) < len(entries)
    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    after = {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    assert all(after[p] == t for p, t in before.items()), "resume rewrote an output that was complete"
    written = set(after) - set(before)
    assert len(written) == len(entries) - len(before)
    rows = read_manifest(Location(str(dst)))
    assert sum("done by an earlier run" in r["notes"] for r in rows) == len(before)
    assert sum(r["status"] == "ok" for r in rows) == len(written) + len(before)
    assert f"{len(before)} skipped" in out.stdout


def test_f6_names_that_are_not_utf8_through_ray_data(ray_local, bicubic_weights, tmp_path):
    """Issue 10, finding 6, on the Ray Data path (rows travel as Arrow, which holds only valid strings)."""
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    raw = b"na\xefve \xfe.png"
    Image.new("RGB", (10, 8), (1, 2, 3)).save(os.fsencode(src) + b"/" + raw, format="PNG")
    Image.new("RGB", (10, 8), (1, 2, 3)).save(src / "fine.png")
    summary = run_job(JobConfig(str(src), str(dst), ModelOptions(weights=bicubic_weights), progress=False, local=False))
    assert summary.ok == 2 and summary.failed == 0
    assert os.path.isfile(os.fsencode(dst) + b"/" + raw)
    rows = read_manifest(Location(str(dst)))
    assert sorted(r["key_bytes"] for r in rows) == sorted([raw, b"fine.png"])


def test_decode_and_generate_jobs_on_ray_data_with_s3(ray_local, s3_server, golden_dir, tmp_path):
    """The other two workflows as bulk jobs on Ray Data, the stage actors loading preset files (the stand-ins): latent
    files from an S3 prefix decoded into another (a batch file split per latent, a bad latent failed alone), and a
    prompt file generated into S3; the images equal the local loop's."""
    import boto3
    import numpy as np
    import torch
    from safetensors.torch import save as st_save
    from test_encoders import build_stand_in

    from conftest import make_tiny_gemma, make_tiny_t2i

    build_stand_in("flux-2k", golden_dir, tmp_path / "flux")
    pid = ModelOptions(str(tmp_path / "flux" / "preset.json"), weights=str(tmp_path / "flux"))
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="lat")
    g = torch.Generator().manual_seed(0)
    bad = torch.randn(16, 4, 3, generator=g)
    bad[0, 0, 0] = float("inf")
    s3.put_object(Bucket="lat", Key="in/one.safetensors", Body=st_save({"z": torch.randn(16, 4, 3, generator=g)}))
    s3.put_object(Bucket="lat", Key="in/batch.safetensors",
                  Body=st_save({"a": torch.randn(16, 2, 2, generator=g), "b": bad}))  # fmt: skip
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    opts = UpscaleOptions(overlap=1)
    cfg = JobConfig("s3://lat/in", "s3://lat/out", pid, opts, s3=settings, progress=False, local=False,
                    workflow="decode")  # fmt: skip
    summary = run_job(cfg)
    rows = {r["key"]: r for r in read_manifest(Location("s3://lat/out", settings))}
    assert {k: r["status"] for k, r in rows.items()} == {"one.safetensors": "ok", "batch.safetensors#a": "ok",
                                                         "batch.safetensors#b": "failed"}  # fmt: skip
    assert "NaN or Inf" in rows["batch.safetensors#b"]["error"] and summary.runner == "Ray Data"
    remote = s3.get_object(Bucket="lat", Key="out/one.png")["Body"].read()
    local = run_job(JobConfig("s3://lat/in/one.safetensors", str(tmp_path / "loc"), pid, opts, s3=settings,
                              progress=False, local=True, workflow="decode"))  # fmt: skip
    assert local.ok == 1 and remote == (tmp_path / "loc" / "one.png").read_bytes()

    t2i, gemma = make_tiny_t2i(tmp_path), make_tiny_gemma(tmp_path / "gemma")
    (tmp_path / "p.txt").write_text("a cat sleeping\n\na red dog\n")
    gen = ModelOptions(str(t2i), text_encoder=str(gemma))
    cfg = JobConfig(str(tmp_path / "p.txt"), "s3://lat/gen", gen, UpscaleOptions(format="png"), s3=settings,
                    progress=False, local=False, workflow="generate")  # fmt: skip
    summary = run_job(cfg)
    assert summary.ok == 2 and summary.runner == "Ray Data"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="lat", Prefix="gen/")["Contents"])
    assert keys == ["gen/000001-a-cat-sleeping.png", "gen/000003-a-red-dog.png", f"gen/{MANIFEST_NAME}"]
    img = Image.open(io.BytesIO(s3.get_object(Bucket="lat", Key="gen/000003-a-red-dog.png")["Body"].read()))
    assert img.size == (48, 32) and np.asarray(img).std() > 1
