"""Bulk jobs never destroy an input, never write outside DST, and always leave a manifest (issue 10, findings 1-8).

Each test is named after its finding. Local folders and the CLI run here as a user runs them; S3 cases use the real
S3-compatible server (moto, 127.0.0.1) through boto3; the Ctrl-C case runs the default command on a real local Ray.
The `small` preset at its bicubic initialisation keeps the model out of the way.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.manifest import MANIFEST_NAME, read_manifest
from jobs.pipeline import JobConfig, run_job
from pipeline.errors import BadInput, SetupError
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.storage import LocalLocation, Location, S3Settings

from conftest import ROOT, S3_CREDS, free_port, png_bytes


def _save(path: Path, color=(200, 30, 30), size=(12, 10), fmt="PNG", mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(dst) -> dict[str, dict]:
    loc = dst if isinstance(dst, Location) else Location(str(dst))
    return {r["key"]: r for r in read_manifest(loc)}


def _job(src, dst, weights, **kw) -> JobConfig:
    options = kw.pop("options", UpscaleOptions())
    return JobConfig(str(src), str(dst), ModelOptions(weights=weights), options, local=True, progress=False, **kw)


def _cli(*args, check_rc=None, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pidray.cli", *args], capture_output=True, text=True, cwd=ROOT, **kw)
    if check_rc is not None:
        assert out.returncode == check_rc, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- 1: keys escape DST
HOSTILE_KEYS = ["in/../../x.png", "in//abs/path.png", "in/sub/../../../y.png", "in/./dot.png"]


@pytest.mark.slow
def test_f1_s3_keys_cannot_escape_a_local_dst(s3_server, bicubic_weights, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="hostile")
    for key in HOSTILE_KEYS + ["in/ok.png"]:
        s3.put_object(Bucket="hostile", Key=key, Body=png_bytes(Image.new("RGB", (8, 8), (9, 9, 9))))
    dst = tmp_path / "a" / "b" / "dst"
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    env = {**os.environ, **S3_CREDS}
    dry = _cli("upscale", "s3://hostile/in", str(dst), "--dry-run", "--s3-endpoint", s3_server, "--weights",
               bicubic_weights, env=env, check_rc=0)  # fmt: skip
    for key in HOSTILE_KEYS:
        rel = key.removeprefix("in/")
        assert any(ln.startswith("failed") and rel in ln and "unsafe name" in ln for ln in dry.stdout.splitlines())
    summary = run_job(_job("s3://hostile/in", dst, bicubic_weights, s3=settings))
    assert summary.ok == 1 and summary.failed == len(HOSTILE_KEYS)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and dst not in p.parents]
    assert outside == [], f"written outside DST: {outside}"
    assert not Path("/abs/path.png").exists()
    rows = _rows(dst)
    for key in HOSTILE_KEYS:
        r = rows[key.removeprefix("in/")]
        assert r["status"] == "failed" and "unsafe name" in r["error"] and r["error_kind"] == "bad_input"
    assert rows["ok.png"]["status"] == "ok" and (dst / "ok.png").is_file()


def test_f1_local_writes_are_proven_inside_dst(tmp_path):
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    outside.mkdir()
    loc = Location(str(dst))
    for key in ("../x.png", "/etc/x.png", "a//b.png", "a/./b.png", "a/../../b.png"):
        with pytest.raises(BadInput, match="unsafe name"):
            loc.write(key, b"data")
    dst.mkdir()
    (dst / "linked").symlink_to(outside)  # a folder inside DST that points elsewhere
    with pytest.raises(BadInput, match="outside DST"):
        loc.write("linked/x.png", b"data")
    (dst / "out.png").symlink_to(outside / "target.png")  # an output name that is a link: never followed; kept,
    with pytest.raises(BadInput, match="appeared in DST"):  # as any file already there,
        loc.write("out.png", b"new")
    assert (dst / "out.png").is_symlink() and not (outside / "target.png").exists()
    loc.write("out.png", b"new", overwrite=True)  # and replaced itself where overwriting is allowed
    assert not (outside / "target.png").exists() and (dst / "out.png").read_bytes() == b"new"
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------------------------------------- 2: DST == SRC
def test_f2_dst_equal_to_src_is_refused_and_in_place_never_overwrites(bicubic_weights, tmp_path):
    d = tmp_path / "d"
    _save(d / "a.png")
    _save(d / "sub" / "b.jpg", fmt="JPEG")
    before = _files(d)
    out = _cli("upscale", str(d), str(d), "--local", "--weights", bicubic_weights, check_rc=2)
    assert "would overwrite the inputs" in _one_line(out.stderr) and _files(d) == before
    out = _cli("upscale", str(d), str(d), "--suffix", "_x4", "--local", "--weights", bicubic_weights, check_rc=2)
    assert "--in-place" in out.stderr and _files(d) == before
    single = _cli("upscale", str(d / "a.png"), str(d), "--local", "--weights", bicubic_weights, check_rc=2)
    assert "--suffix" in single.stderr and _files(d) == before

    args = ["upscale", str(d), str(d), "--in-place", "--suffix", "_x4", "--local", "--weights", bicubic_weights]
    _cli(*args, check_rc=0)
    after = _files(d)
    assert all(after[k] == v for k, v in before.items()), "an input was overwritten"
    assert {"a_x4.png", "sub/b_x4.jpg"} <= set(after)
    _cli(*args, "--overwrite", check_rc=0)  # again: the earlier outputs are not taken as inputs (and are replaced)
    assert "_x4_x4" not in " ".join(_files(d))
    rows = _rows(d)
    assert rows["a_x4.png"]["status"] == "skipped" and "earlier in-place run" in rows["a_x4.png"]["error"]
    assert rows["a.png"]["status"] == "ok" and all(_files(d)[k] == v for k, v in before.items())
    _cli("upscale", str(d / "a.png"), str(d), "--suffix", "_s", "--local", "--weights", bicubic_weights, check_rc=0)
    assert (d / "a_s.png").is_file() and (d / "a.png").read_bytes() == before["a.png"]


@pytest.mark.slow
def test_f2_same_s3_prefix_is_refused(s3_server, bicubic_weights):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="same")
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    for dst in ("s3://same/raw", "s3://same/raw/", "s3://same//raw"):
        with pytest.raises(SetupError, match="would overwrite the inputs"):
            run_job(_job("s3://same/raw", dst, bicubic_weights, s3=settings))


# ---------------------------------------------------------------------------------------------- 3: DST inside SRC
def test_f3_dst_inside_src_is_never_read_back(bicubic_weights, tmp_path):
    src = tmp_path / "photos"
    for i in range(3):
        _save(src / f"p{i}.png", color=(i * 60, 20, 20))
    for again in (False, True):
        summary = run_job(_job(src, src / "upscaled", bicubic_weights, overwrite=again))
        assert summary.ok == 3 and summary.failed == 0
    assert not (src / "upscaled" / "upscaled").exists()
    assert set(_rows(src / "upscaled")) == {"p0.png", "p1.png", "p2.png"}


@pytest.mark.slow
def test_f3_s3_dst_prefix_inside_src_prefix_is_left_out(s3_server, bicubic_weights):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="nested")
    s3.put_object(Bucket="nested", Key="raw/a.png", Body=png_bytes(Image.new("RGB", (8, 8))))
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    for again in (False, True):
        summary = run_job(_job("s3://nested/raw", "s3://nested/raw/4k", bicubic_weights, s3=settings, overwrite=again))
        assert summary.ok == 1
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="nested")["Contents"]}
    assert keys == {"raw/a.png", "raw/4k/a.png", f"raw/4k/{MANIFEST_NAME}"}


# ---------------------------------------------------------------------------------------------- 4: name collisions
def test_f4_colliding_names_get_distinct_outputs(bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    colors = {"a.png": (220, 10, 10), "a.gif": (10, 220, 10), "a.bmp": (10, 10, 220), "a.png.gif": (200, 200, 0)}
    for name, c in colors.items():
        _save(src / name, color=c, fmt={"png": "PNG", "gif": "GIF", "bmp": "BMP"}[name.rsplit(".", 1)[1]])
    summary = run_job(_job(src, dst, bicubic_weights))
    assert summary.ok == 4
    rows = _rows(dst)
    outputs = [rows[k]["output_key"] for k in colors]
    assert len(set(outputs)) == 4, outputs
    for name, c in colors.items():
        img = np.asarray(Image.open(dst / rows[name]["output_key"]).convert("RGB"), dtype=float)
        assert np.abs(img.mean(axis=(0, 1)) - c).max() < 12, (name, rows[name]["output_key"])
    assert rows["a.gif"]["output_key"] == "a.gif.png" and rows["a.png"]["output_key"] == "a.png.png"
    resumed = run_job(_job(src, dst, bicubic_weights, resume=True))  # named the same way again: all found
    assert resumed.skipped == 4 and resumed.ok == 0


# ---------------------------------------------------------------------------------------------- 5: setup errors
@pytest.mark.parametrize("case", ["dst under a file", "dst is a file", "missing src", "bad device"])
def test_f5_local_setup_errors_are_one_line_before_any_work(tmp_path, case):
    src = tmp_path / "in"
    _save(src / "a.png")
    (tmp_path / "file.txt").write_text("x")
    dst, extra, expect = tmp_path / "out", [], ""
    if case == "dst under a file":
        dst, expect = tmp_path / "file.txt" / "out", "cannot write to"
    elif case == "dst is a file":
        dst, expect = tmp_path / "file.txt", "it is a file"
    elif case == "missing src":
        src, expect = tmp_path / "nope", "input not found"
    else:
        extra, expect = ["--device", "cuda"], "CUDA is not available"
    t0 = time.time()
    # weights that do not exist: the error shown is the storage/device one, so it was checked before the model
    out = _cli("upscale", str(src), str(dst), "--local", "--weights", str(tmp_path / "none.safetensors"), *extra,
               check_rc=2)  # fmt: skip
    line = _one_line(out.stderr)
    assert expect in line and "none.safetensors" not in line, line
    assert time.time() - t0 < 30


@pytest.mark.slow
def test_f5_s3_setup_errors_are_one_line_before_any_work(s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="src-ok")
    s3.put_object(Bucket="src-ok", Key="in/a.png", Body=png_bytes(Image.new("RGB", (8, 8))))
    auth_port = free_port()
    env = {**os.environ, **S3_CREDS}
    strict = subprocess.Popen(  # a second S3 server that checks credentials
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(auth_port)],
        env={**env, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", auth_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        cases = [
            ("s3://src-ok/in", "s3://no-such-bucket/out", s3_server, "bucket does not exist"),
            ("s3://no-such-src/in", str(tmp_path / "out"), s3_server, "bucket does not exist"),
            ("s3://src-ok/in", "s3://src-ok/out", f"http://127.0.0.1:{free_port()}", "cannot be reached"),
            ("s3://src-ok/in", str(tmp_path / "out"), f"http://127.0.0.1:{auth_port}", "rejected the credentials"),
        ]
        for src, dst, endpoint, expect in cases:
            t0 = time.time()
            out = _cli("upscale", src, dst, "--s3-endpoint", endpoint, "--weights", str(tmp_path / "none.safetensors"),
                       env=env, check_rc=2)  # fmt: skip
            line = _one_line(out.stderr)
            print(f"{time.time() - t0:.1f}s: {line}")
            assert expect in line and "botocore" not in line, line
            assert time.time() - t0 < 60
        traced = subprocess.run([sys.executable, "-m", "pidray.cli", "--debug", "upscale", "s3://no-such-src/in",
                                 str(tmp_path / "o"), "--s3-endpoint", s3_server], capture_output=True, text=True,
                                cwd=ROOT, env=env)  # fmt: skip
        assert traced.returncode != 0 and "Traceback" in traced.stderr  # --debug keeps the traceback
    finally:
        strict.terminate()
        strict.wait()


# ---------------------------------------------------------------------------------------------- 6: non-UTF-8 names
def test_f6_names_that_are_not_utf8_still_get_a_manifest(bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    raw = b"caf\xe9 \xff.png"  # Latin-1 bytes: not UTF-8
    name = os.fsdecode(raw)
    _save(src / name)
    _save(src / "plain.png")
    summary = run_job(_job(src, dst, bicubic_weights))
    assert summary.ok == 2
    assert os.path.exists(os.fsencode(dst) + b"/" + raw), "the output keeps the input's exact name"
    rows = read_manifest(Location(str(dst)))
    weird = next(r for r in rows if r["key_bytes"] == raw)
    assert weird["status"] == "ok" and weird["key"] == "caf\\xe9 \\xff.png"
    again = run_job(_job(src, dst, bicubic_weights, resume=True))
    assert again.skipped == 2


# ---------------------------------------------------------------------------------------------- 7: Ctrl-C / SIGTERM
def _interrupt(cmd: list[str], dst: Path, sig: int, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + timeout
    while time.time() < deadline and not [p for p in dst.rglob("*.png")]:
        time.sleep(0.05)
    assert [p for p in dst.rglob("*.png")], "no output appeared before the deadline"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig,mode", [(signal.SIGTERM, "--local"), (signal.SIGINT, "ray")])
def test_f7_interrupt_stops_cleanly_and_writes_the_manifest(bicubic_weights, tmp_path, sig, mode):
    if mode == "ray":
        pytest.importorskip("ray")
    src, dst = tmp_path / "in", tmp_path / "out"
    for i in range(24):
        _save(src / f"img{i:02d}.png", color=(i * 10, 50, 50), size=(40, 40))
    cmd = [sys.executable, "-m", "pidray.cli", "upscale", str(src), str(dst), "--weights", bicubic_weights]
    cmd += ["--local"] if mode == "--local" else []
    out = _interrupt(cmd, dst, sig, timeout=180)
    assert out.returncode == 128 + sig, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "--resume" in out.stderr
    rows = _rows(dst)
    assert len(rows) == 24, "one manifest row per input"
    done = {p.name for p in dst.glob("*.png")}
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    landed = {k for k, r in rows.items() if r["status"] == "interrupted" and r["output_key"]}  # not yet reported
    assert ok | landed == done and not ok & landed, (ok, landed, done)
    assert {r["status"] for r in rows.values()} <= {"ok", "interrupted"} and len(done) < 24
    assert not list(dst.rglob(".pidray-*"))


# ---------------------------------------------------------------------------------------------- 8: smaller ones
@pytest.mark.slow
def test_f8_single_s3_object_as_src(s3_server, bicubic_weights, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="single")
    s3.put_object(Bucket="single", Key="raw/one.png", Body=png_bytes(Image.new("RGB", (8, 6))))
    s3.put_object(Bucket="single", Key="raw/other.png", Body=png_bytes(Image.new("RGB", (8, 6))))
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    summary = run_job(_job("s3://single/raw/one.png", tmp_path / "out", bicubic_weights, s3=settings))
    assert summary.ok == 1 and set(_rows(tmp_path / "out")) == {"one.png"}
    assert Image.open(tmp_path / "out" / "one.png").size == (32, 24)


@pytest.mark.parametrize(
    "args,message",
    [(["--overlap", "1000"], "--overlap 1000 must be"), (["-t", "8"], "--tile"),
     (["--device", "bogus"], "unknown device"), (["--diffuse-actors", "0"], "must be at least 1"),
     (["--seed", str(2**64)], "2\\^63"),
     (["-m", "nope"], "unknown preset .nope.")],
)  # fmt: skip
def test_f8_bad_flags_are_refused_up_front(tmp_path, args, message):
    import re

    _save(tmp_path / "in" / "a.png")
    out = _cli("upscale", str(tmp_path / "in"), str(tmp_path / "out"), "--local", *args, check_rc=2)
    assert re.search(message, out.stderr), out.stderr
    assert "hf download" not in out.stderr  # never asks for weights a preset cannot use anyway


def test_f8_hidden_files_and_links_are_recorded_not_silently_dropped(bicubic_weights, tmp_path):
    src, dst, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    _save(src / "..png")
    _save(src / "visible.png")
    _save(outside / "secret.png", color=(1, 2, 3))
    (src / "link.png").symlink_to(outside / "secret.png")
    summary = run_job(_job(src, dst, bicubic_weights))
    rows = _rows(dst)
    assert summary.ok == 1 and rows["..png"]["status"] == "skipped" and "--include-hidden" in rows["..png"]["error"]
    assert rows["link.png"]["status"] == "skipped" and "not followed" in rows["link.png"]["error"]
    assert not (dst / "link.png").exists()
    summary = run_job(_job(src, dst, bicubic_weights, include_hidden=True, follow_symlinks=True, resume=True))
    rows = _rows(dst)
    assert rows["..png"]["status"] == "ok" and (dst / "..png").is_file()
    assert rows["link.png"]["status"] == "ok" and "symbolic link to" in rows["link.png"]["notes"]


def test_f8_output_format_size_limit_alpha_and_resume_sizes(bicubic_weights, tmp_path, monkeypatch):
    src, dst = tmp_path / "in", tmp_path / "out"
    _save(src / "photo.png", size=(10, 8))
    _save(src / "opaque.png", color=(5, 6, 7, 255), mode="RGBA", size=(6, 6))
    _save(src / "wide.png", size=(1100, 4))
    bmp = run_job(_job(src, dst, bicubic_weights, options=UpscaleOptions(format="bmp")))
    assert Image.open(dst / "photo.bmp").format == "BMP" and not (dst / "photo.png").exists()
    assert bmp.ok == 3
    monkeypatch.setattr("jobs.pipeline.receipts.remove", lambda dst, job: None)  # as if it crashed before its end
    scaled = run_job(_job(src, tmp_path / "s16", bicubic_weights, options=UpscaleOptions(scale=16)))
    monkeypatch.undo()
    rows = _rows(tmp_path / "s16")
    assert scaled.failed == 1 and "16384" in rows["wide.png"]["error"] and rows["wide.png"]["error_kind"] == "too_large"
    assert Image.open(tmp_path / "s16" / "opaque.png").mode == "RGBA"  # fully opaque alpha is kept
    (tmp_path / "s16" / MANIFEST_NAME).unlink()  # as a crash leaves it: the outputs' receipts, no manifest
    resumed = run_job(_job(src, tmp_path / "s16", bicubic_weights, options=UpscaleOptions(scale=16), resume=True))
    rows = _rows(tmp_path / "s16")
    assert resumed.skipped == 2 and resumed.already == 2 and rows["photo.png"]["status"] == "ok"
    assert (rows["photo.png"]["in_h"], rows["photo.png"]["out_h"], rows["photo.png"]["out_w"]) == (8, 128, 160)


def test_f8_info_into_a_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "pidray.cli", "info", "small", "--keys"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)  # fmt: skip
    first = proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert first.startswith(b"preset small") and "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert proc.returncode in (0, 141)


def test_storage_failures_are_what_storage_raises_and_never_a_bug():
    """`except storage_failures():` catches an OS error, pidray's refusals, a bad value and botocore's errors (once
    botocore is loaded), never a bug's KeyError, TypeError or AttributeError."""
    import botocore.exceptions as bx

    from pipeline.errors import storage_failures

    caught = storage_failures()
    for err in (FileNotFoundError("x"), PermissionError(13, "denied"), SetupError("x"), BadInput("x"),
                UnicodeEncodeError("utf-8", "x", 0, 1, "surrogate"), bx.EndpointConnectionError(endpoint_url="u"),
                bx.ClientError({"Error": {"Code": "404"}}, "HeadObject")):  # fmt: skip
        assert isinstance(err, caught), err
    for err in (KeyError("x"), TypeError("x"), AttributeError("x"), RuntimeError("x")):
        assert not isinstance(err, caught), err


def test_f8_manifest_falls_back_when_dst_cannot_take_it(tmp_path, monkeypatch):
    from jobs.manifest import manifest_row
    from jobs.manifest_writer import write_manifest

    class Broken(LocalLocation):  # a local DST that refuses every write
        def write(self, key, data):
            raise PermissionError(13, "denied")

    monkeypatch.chdir(tmp_path)
    where = write_manifest(Broken(str(tmp_path / "dst")), [manifest_row({"key": "a.png", "status": "ok"}, "small")])
    assert Path(where).parent == tmp_path and Path(where).stat().st_size > 0


def test_f8_resume_reads_previous_manifest_rows(tmp_path):
    from jobs.manifest import load_manifest, manifest_row
    from jobs.manifest_writer import write_manifest

    loc = Location(str(tmp_path))
    write_manifest(loc, [manifest_row({"key": os.fsdecode(b"x\xff.png"), "status": "ok", "in_hw": [3, 4]}, "small")])
    rows = load_manifest(loc)
    assert list(rows) == [os.fsdecode(b"x\xff.png")] and rows[os.fsdecode(b"x\xff.png")]["in_h"] == 3


# ------------------------------------------------------------------------------ two jobs, earlier outputs, manifests
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lease_file(dst: Path, **info) -> None:
    import json
    import socket

    dst.mkdir(parents=True, exist_ok=True)
    from jobs.lease import _namespace

    base = {"owner": "otherjob", "host": socket.gethostname(), "pid": os.getpid(), "ns": _namespace(),
            "expires": time.time() + 100}  # fmt: skip
    (dst / ".pidray-lock").write_text(json.dumps({**base, **info}))


def test_a_second_job_into_a_dst_in_use_is_refused_and_the_first_is_intact(bicubic_weights, tmp_path):
    """`pidray upscale s1 dst & pidray upscale s2 dst &`: the second job is refused up front (one line naming the
    job that holds DST) while the first runs on; the first's outputs and manifest are its own, nothing left over."""
    s1, s2, dst = tmp_path / "s1", tmp_path / "s2", tmp_path / "dst"
    for i in range(6):
        _save(s1 / f"one{i}.png", color=(20 * i, 40, 40), size=(64, 64))
        _save(s2 / f"two{i}.png", color=(20 * i, 90, 90), size=(64, 64))
    _save(s1 / "common.png", color=(250, 10, 10), size=(64, 64))
    _save(s2 / "common.png", color=(10, 10, 250), size=(64, 64))
    cmd = [sys.executable, "-m", "pidray.cli", "upscale", str(s1), str(dst), "--local", "--weights", bicubic_weights]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (dst / ".pidray-lock").exists() and first.poll() is None:
            time.sleep(0.02)
        assert (dst / ".pidray-lock").exists(), "the first job never took DST's lease"
        with pytest.raises(SetupError, match="in use by another pidray job") as refused:
            run_job(_job(s2, dst, bicubic_weights))
        assert first.poll() is None, "the first job ended before the second was refused: the test proves nothing"
        message = str(refused.value)
        assert "\n" not in message and f"pid {first.pid}" in message and "another DST" in message, message
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert "7 ok" in stdout
    rows = _rows(dst)
    assert set(rows) == {f"one{i}.png" for i in range(6)} | {"common.png"}
    assert all(r["status"] == "ok" for r in rows.values())
    red = np.asarray(Image.open(dst / "common.png").convert("RGB"), dtype=float).mean(axis=(0, 1))
    assert red[0] > 200 and red[2] < 50, red  # job 1's common.png, not job 2's
    assert not list(dst.rglob(".pidray-*")), "the lease and every temporary are gone"
    assert not any(p.name.startswith("two") for p in dst.iterdir())


def test_a_stale_lease_is_taken_over_and_only_its_own_temporaries_removed(bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    _save(src / "a.png")
    _lease_file(dst, owner="dead00000001", pid=_dead_pid())  # same host, its process gone
    (dst / ".pidray-dead00000001-x1x1x1x1.part").write_bytes(b"half")
    (dst / ".pidray-11fe00000001-x2x2x2x2.part").write_bytes(b"someone else's, in flight")
    summary = run_job(_job(src, dst, bicubic_weights))
    assert summary.ok == 1
    assert not (dst / ".pidray-dead00000001-x1x1x1x1.part").exists()
    assert (dst / ".pidray-11fe00000001-x2x2x2x2.part").exists()
    assert not (dst / ".pidray-lock").exists()
    _lease_file(dst, owner="fa0000000001", host="another-host", pid=1, expires=time.time() - 5)  # expired
    assert run_job(_job(src, dst, bicubic_weights, overwrite=True)).ok == 1
    assert (dst / ".pidray-11fe00000001-x2x2x2x2.part").exists()
    _lease_file(dst, owner="11fe00000001", pid=os.getpid())  # alive, not expired: refused, DST untouched
    before = _files(dst)
    with pytest.raises(SetupError, match="in use by another pidray job 11fe00000001"):
        run_job(_job(src, dst, bicubic_weights))
    assert _files(dst) == before
    assert run_job(_job(src, dst, bicubic_weights, dry_run=True)).rows  # a dry run writes nothing: no lease


def test_a_lease_is_released_after_an_error_inside_the_job(bicubic_weights, tmp_path, monkeypatch):
    import jobs.pipeline as jp

    src, dst = tmp_path / "in", tmp_path / "out"
    _save(src / "a.png")

    def broken(cfg):
        raise RuntimeError("planning broke")

    monkeypatch.setattr(jp, "plan_job", broken)
    with pytest.raises(RuntimeError):
        run_job(_job(src, dst, bicubic_weights))
    assert not (dst / ".pidray-lock").exists()


def test_a_lease_lost_to_another_job_stops_the_writer(tmp_path):
    from jobs.lease import Lease

    dst = Location(str(tmp_path))
    mine = Lease(dst, "mine", ttl=-1)  # expires at once: as if this job had stalled past its lease
    mine.acquire()
    theirs = Lease(dst, "theirs")
    theirs.acquire()
    mine.renew()
    with pytest.raises(SetupError, match="another job .theirs. holds DST"):
        mine.check()
    mine.release()  # leaves the other job's lease alone
    assert b"theirs" in (tmp_path / ".pidray-lock").read_bytes()
    theirs.release()
    assert not (tmp_path / ".pidray-lock").exists()


def _race_for_the_lease(uri: str, owner: str, start: float, won) -> None:
    from jobs.lease import Lease

    while time.time() < start:
        pass
    try:
        Lease(Location(uri), owner).acquire()
    except SetupError:
        return
    won.put(owner)
    time.sleep(1.0)  # keep holding (alive) while the others look


@pytest.mark.parametrize("stale", [False, True])
def test_jobs_starting_at_once_get_one_lease(tmp_path, stale):
    """Four processes race for a free lease, or to take over a stale one: exactly one wins each time (a lease file
    is never seen half written, and a takeover happens once)."""
    import json
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(3):
        d = tmp_path / str(trial)
        d.mkdir()
        if stale:
            (d / ".pidray-lock").write_text(json.dumps({"owner": "dead00000000", "host": "x", "pid": 1, "expires": 0}))
        won, start = ctx.Queue(), time.time() + 0.3
        procs = [ctx.Process(target=_race_for_the_lease, args=(str(d), f"{i:012x}", start, won)) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=30)
        winners = []
        while not won.empty():
            winners.append(won.get())
        assert len(winners) == 1, (trial, winners)
        assert json.loads((d / ".pidray-lock").read_text())["owner"] == winners[0]


@pytest.mark.slow
def test_s3_lease_is_a_conditional_create_with_expiry(s3_server):
    import boto3

    from jobs.lease import LEASE_NAME, Lease

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="leased")
    dst = Location("s3://leased/out", S3Settings(endpoint_url=s3_server, region="us-east-1"))
    first = Lease(dst, "f1f1f1f1f1f1")
    first.acquire()
    with pytest.raises(SetupError, match="in use by another pidray job f1f1f1f1f1f1"):
        Lease(dst, "5ec05ec05ec0").acquire()
    first.renew()
    assert not first.lost
    first.release()
    assert not dst.exists(LEASE_NAME)
    stale = Lease(dst, "57a1e57a1e57", ttl=-1)
    stale.acquire()
    found = dst.read_with_etag(LEASE_NAME)
    a, b = Lease(dst, "aaaaaaaaaaaa"), Lease(dst, "bbbbbbbbbbbb")
    assert a._take_over(found, a.parse(found[0]))  # If-Match on the stale version: one taker wins ...
    assert not b._take_over(found, b.parse(found[0]))  # ... the other's version is gone
    stale.renew()
    assert "another job (aaaaaaaaaaaa)" in stale.lost
    with pytest.raises(SetupError, match="in use by another pidray job aaaaaaaaaaaa"):
        Lease(dst, "cccccccccccc").acquire()
    a.release()
    assert not dst.exists(LEASE_NAME)


def test_in_place_never_takes_a_users_file_for_an_earlier_output(bicubic_weights, tmp_path):
    """`--in-place --suffix _2` with the user's own photo_2.png: no manifest says pidray wrote it, so it is an input,
    and photo.png, whose output would land on it, fails with the reason; nothing is overwritten."""
    d = tmp_path / "d"
    _save(d / "photo.png", color=(200, 0, 0))
    _save(d / "photo_2.png", color=(0, 0, 200), size=(7, 5))
    before = _files(d)
    out = _cli("upscale", str(d), str(d), "--in-place", "--suffix", "_2", "--local", "--weights", bicubic_weights,
               check_rc=3)  # fmt: skip
    assert (d / "photo_2.png").read_bytes() == before["photo_2.png"] and "would overwrite an input" in out.stderr
    rows = _rows(d)
    assert rows["photo.png"]["status"] == "failed" and "photo_2.png" in rows["photo.png"]["error"]
    assert rows["photo_2.png"]["status"] == "ok" and (d / "photo_2_2.png").is_file()
    assert all(_files(d)[k] == v for k, v in before.items())


@pytest.mark.parametrize("damage", ["string seed", "missing out_h", "null out_h", "not parquet", "foreign table"])
def test_a_damaged_manifest_is_set_aside_and_a_new_one_written(bicubic_weights, tmp_path, capsys, damage):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.manifest import read_previous

    src, dst = tmp_path / "in", tmp_path / "out"
    _save(src / "a.png")
    _save(src / "b.png", color=(1, 2, 3))
    assert run_job(_job(src, dst, bicubic_weights)).ok == 2
    (dst / "b.png").unlink()  # to be redone
    table = pq.read_table(dst / MANIFEST_NAME)
    if damage == "string seed":
        table = table.set_column(table.schema.get_field_index("seed"), "seed", pa.array(["x"] * table.num_rows))
    elif damage == "missing out_h":
        table = table.drop_columns(["out_h"])
    elif damage == "null out_h":
        table = table.set_column(table.schema.get_field_index("out_h"), "out_h", pa.array([None, 4], pa.int64()))
    elif damage == "foreign table":
        table = pa.table({"name": ["a.png"], "size": [3]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = b"PAR1 not really" if damage == "not parquet" else buf.getvalue()
    (dst / MANIFEST_NAME).write_bytes(data)
    capsys.readouterr()
    summary = run_job(_job(src, dst, bicubic_weights, resume=True))
    err = capsys.readouterr().err
    # a.png's output: proven by what is left of its row (its key, output and the writing job's id), so kept; with
    # no row left at all (not a manifest) nothing proves it, and it is kept in DST but not adopted
    lost = damage in ("not parquet", "foreign table")
    assert (summary.skipped, summary.failed, summary.ok) == ((0, 1, 1) if lost else (1, 0, 1)), summary.line()
    assert err.count("warning:") == 1 and "set aside" in err, err
    backups = list(dst.glob(f"{MANIFEST_NAME}.bad-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == data and backups[0].name in err
    fresh = read_previous(Location(str(dst)))
    assert not fresh.problem and set(fresh.rows) == {"a.png", "b.png"}
    assert fresh.rows["a.png"]["status"] == ("failed" if lost else "ok") and fresh.rows["b.png"]["status"] == "ok"
    assert (dst / "a.png").is_file()
    if damage == "null out_h":  # the one good row (b.png) was kept; a.png's was set aside
        assert "1 of 2 rows" in err


@pytest.mark.slow
def test_a_damaged_s3_manifest_is_kept_as_a_backup(s3_server):
    import boto3

    from jobs.manifest import read_previous, set_aside

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="damaged")
    s3.put_object(Bucket="damaged", Key=f"out/{MANIFEST_NAME}", Body=b"not a manifest")
    dst = Location("s3://damaged/out", S3Settings(endpoint_url=s3_server, region="us-east-1"))
    prev = read_previous(dst)
    assert prev.problem and not prev.rows
    backup = set_aside(dst, prev)
    assert s3.get_object(Bucket="damaged", Key=f"out/{backup}")["Body"].read() == b"not a manifest"
