"""DST's lease under attack: a lease file is data that any program may have written, and a job that lost its lease
writes nothing more into DST.

(a) a crafted owner in a stale lease never turns into a path or a pattern: the job that takes the lease over removes
    only temporaries named exactly as pidray names that (valid) job's, inside DST, never through a link;
(b) a job stalled past its lease (SIGSTOP) and taken over by another job writes nothing into DST once it resumes
    (SIGCONT), and the other job's manifest lands in DST;
(c) a lock name that holds a FIFO, a link or a folder is refused in one line (never opened: no hang), and lease fields
    are printed escaped and cut short; an expiry that is no time (NaN, infinities, huge, a bool, text) makes the
    lease unreadable, hence stale.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.lease import LEASE_NAME, Lease, _namespace
from jobs.manifest import MANIFEST_NAME, read_manifest
from jobs.pipeline import JobConfig, run_job
from pipeline.errors import SetupError
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.storage import LeaseLost, Location, check_lease

from conftest import ROOT

DEAD = "deadbeef0001"  # job ids as pidray makes them: 12 lowercase hex digits
LIVE = "0123456789ab"
ESCAPES = "\x1b[2J\x1b]52;c;cm0gLXJmIH4K\x07\x9b31m\u202e"  # clear screen, OSC-52 clipboard write, C1 CSI, RLO


def _save(path: Path, color=(200, 30, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _job(src, dst, weights) -> JobConfig:
    return JobConfig(str(src), str(dst), ModelOptions(weights=weights), UpscaleOptions(), local=True, progress=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lease(dst: Path, raw_expires: str | None = None, **info) -> None:
    """A lease file as another program could write it (`raw_expires`: the expiry's JSON text, written as is)."""
    dst.mkdir(parents=True, exist_ok=True)
    base = {"owner": LIVE, "host": socket.gethostname(), "pid": os.getpid(), "ns": _namespace(),
            "expires": time.time() + 100}  # fmt: skip
    text = json.dumps({**base, **info})
    if raw_expires is not None:
        text = text[:-1] + f', "expires": {raw_expires}}}'  # the last key wins in JSON objects as Python reads them
    (dst / LEASE_NAME).write_text(text)


def _cli(*args, cwd=ROOT, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pidray.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)  # fmt: skip


# ------------------------------------------------------------------------ (a) a crafted owner deletes nothing
@pytest.mark.parametrize("owner", ["a/../../outside/x", "*", f"{DEAD}/../../outside/x", "../*", DEAD.upper()])
def test_a_crafted_lease_owner_removes_nothing_outside_dst_nor_another_jobs_temporaries(bicubic_weights, tmp_path,
                                                                                         owner, capsys):  # fmt: skip
    src, dst, outside = tmp_path / "in", tmp_path / "dst", tmp_path / "outside"
    _save(src / "a.png")
    outside.mkdir()
    (outside / "x-victim.part").write_bytes(b"victim")  # what `a/../../outside/x` named through the old glob
    (outside / f".pidray-{DEAD}-abcd1234.part").write_bytes(b"not DST's")
    (dst / ".pidray-a").mkdir(parents=True)  # the folder the crafted path climbs out of
    (dst / "sub").mkdir()
    theirs = [dst / f".pidray-{LIVE}-k3j_x9qa.part", dst / "sub" / f".pidray-{LIVE}-zz00zz00.part"]
    for p in theirs:  # another live job's in-flight temporaries: a pattern `*` matched them
        p.write_bytes(b"another job's, in flight")
    _lease(dst, owner=owner, pid=_dead_pid())  # this host, its process gone: stale
    before_outside, before_dst = _files(outside), _files(dst)
    summary = run_job(_job(src, dst, bicubic_weights))
    assert summary.ok == 1
    assert _files(outside) == before_outside, "a file outside DST changed"
    after = _files(dst)
    assert all(after[k] == v for k, v in before_dst.items() if k != LEASE_NAME), "a file in DST was removed"
    assert all(p.exists() for p in theirs)
    assert not (dst / LEASE_NAME).exists()
    err = capsys.readouterr().err
    assert "took over DST's lease from a lease file, which was stale (it cannot be read: it names no pidray job)" in err
    assert owner not in err


def test_a_only_the_dead_jobs_exact_temporaries_inside_dst_are_removed(bicubic_weights, tmp_path, capsys):
    src, dst, outside = tmp_path / "in", tmp_path / "dst", tmp_path / "outside"
    _save(src / "a.png")
    outside.mkdir()
    (outside / f".pidray-{DEAD}-abcd1234.part").write_bytes(b"reached only through a link")
    (outside / "target").write_bytes(b"a link's target")
    dst.mkdir()
    (dst / "elsewhere").symlink_to(outside, target_is_directory=True)  # a folder in DST that links out of it
    (dst / f".pidray-{DEAD}-linklink.part").symlink_to(outside / "target")
    (dst / f".pidray-{DEAD}-dirdir_1.part").mkdir()
    gone = [dst / f".pidray-{DEAD}-abcd_123.part", dst / "s" / "t" / f".pidray-{DEAD}-q9q9q9q9.part"]
    kept = [dst / name for name in (f".pidray-{DEAD}-x1.part", f".pidray-{DEAD}-abcd1234.part.bak",
                                    f"x.pidray-{DEAD}-abcd1234.part", f".pidray-{DEAD}-abcd12345.part",
                                    f".pidray-{LIVE}-abcd1234.part", "notes.part")]  # fmt: skip
    for p in gone + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    _lease(dst, owner=DEAD, pid=_dead_pid())
    before_outside = _files(outside)
    assert run_job(_job(src, dst, bicubic_weights)).ok == 1
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in kept)
    assert (dst / f".pidray-{DEAD}-linklink.part").is_symlink() and (dst / f".pidray-{DEAD}-dirdir_1.part").is_dir()
    assert _files(outside) == before_outside
    assert f"took over DST's lease from job {DEAD}" in capsys.readouterr().err
    assert Location(str(dst)).remove_temporaries("*") == 0 and Location(str(dst)).remove_temporaries("../x") == 0
    assert all(p.exists() for p in kept)


# ------------------------------------------------------------------------ (b) a job that lost its lease stops writing
def test_b_a_job_stalled_past_its_lease_writes_nothing_after_another_took_dst_over(bicubic_weights, tmp_path):
    """A is stopped (SIGSTOP) mid-job past its lease; B takes DST over; A resumes (SIGCONT) while B works: A writes
    nothing more into DST (its in-flight outputs, its manifest) and says where its manifest went; B's lands in DST."""
    s1, s2, dst = tmp_path / "s1", tmp_path / "s2", tmp_path / "dst"
    cwd_a, cwd_b = tmp_path / "cwd_a", tmp_path / "cwd_b"
    cwd_a.mkdir()
    cwd_b.mkdir()
    for i in range(24):
        _save(s1 / f"one{i:02d}.png", color=(10 * i, 40, 40), size=(24, 20))
    for i in range(3):
        _save(s2 / f"two{i}.png", color=(10 * i, 90, 90))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDRAY_LEASE_TTL_S": "2", "PIDRAY_LEASE_RENEW_S": "0.2"}
    cmd = [sys.executable, "-m", "pidray.cli", "upscale", "--local", "--no-progress", "--weights", bicubic_weights]
    a = subprocess.Popen([*cmd, str(s1), str(dst)], cwd=cwd_a, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    b = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and a.poll() is None and not list(dst.glob("one*.png")):
            time.sleep(0.01)
        assert a.poll() is None and list(dst.glob("one*.png")), "job A never wrote an output"
        time.sleep(0.3)  # past its first chunk's writes: the next chunk is in flight
        a.send_signal(signal.SIGSTOP)
        held = json.loads((dst / LEASE_NAME).read_text())
        job_a = held["owner"]
        time.sleep(max(0.0, held["expires"] - time.time()) + 0.5)  # A's lease runs out while it is stopped
        b = subprocess.Popen([*cmd, str(s2), str(dst)], cwd=cwd_b, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        while time.time() < deadline and b.poll() is None:
            try:
                b_id = json.loads((dst / LEASE_NAME).read_text())["owner"]
                if b_id != job_a:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        assert b.poll() is None, b.communicate()
        taken = _files(dst)  # DST the moment B holds it: A may add or change nothing from now on
        stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.glob("one*.png")}
        a.send_signal(signal.SIGCONT)
        out_a, err_a = a.communicate(timeout=240)
        out_b, err_b = b.communicate(timeout=240)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert b.returncode == 0, (out_b, err_b)
    assert a.returncode == 2, (out_a, err_a)
    assert "Traceback" not in err_a + err_b and "internal error" not in err_a + err_b
    final = _files(dst)
    for name, data in final.items():  # every file: as it was at the takeover, or B's
        if name in taken:
            assert data == taken[name], f"{name} changed after job B took DST over"
        else:
            assert name.startswith(("two", MANIFEST_NAME)) or (name.startswith(".pidray-") and job_a not in name), name
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.glob("one*.png")} == stats
    assert f"manifest: {dst}/{MANIFEST_NAME}" in out_b and not list(cwd_b.iterdir())
    rows = {r["key"]: r for r in read_manifest(Location(str(dst)))}
    assert all(rows[f"two{i}.png"]["status"] == "ok" for i in range(3)), rows
    assert not list(dst.rglob(f".pidray-{job_a}-*.part")), "job A left temporaries in DST"
    # A's manifest is in its current folder (every file of it named by one warning line with the reason), and A
    # ends with one line naming the job that holds DST and where its manifest is
    fallback = [str(p) for p in cwd_a.iterdir()]
    warned = [ln for ln in err_a.splitlines() if "the manifest could not be written into DST" in ln]
    assert len(fallback) == 1 and fallback[0].endswith(".parquet") and len(warned) == 1, (err_a, fallback)
    assert fallback[0] in warned[0] and f"another job ({b_id}) holds DST" in warned[0], err_a
    last = err_a.strip().splitlines()[-1]
    assert last.startswith(f"pidray upscale: error: stopped: another job ({b_id}) holds DST"), err_a
    assert last.endswith(f"its manifest is at {fallback[0]}"), err_a
    rows_a = {r["key"]: r for r in pq.read_table(fallback[0]).to_pylist()}
    assert rows_a and all(k.startswith("one") for k in rows_a), rows_a
    assert (dst / LEASE_NAME).exists() is False


def test_b_the_write_stage_and_the_manifest_check_the_lease_before_each_publish(tmp_path):
    from jobs.lease import Fenced
    from pipeline.stages import WriteStage

    dst = Location(str(tmp_path))
    mine = Lease(dst, LIVE)
    mine.acquire()
    dst.tag = LIVE
    row = {"output_stem": "a", "extension": ".png", "output": b"x"}
    WriteStage(dst).process(dict(row))
    assert (tmp_path / "a.png").exists()
    _lease(tmp_path, owner=DEAD)  # another job holds DST now
    with pytest.raises(LeaseLost, match=f"another job .{DEAD}. holds DST"):
        WriteStage(Location(str(tmp_path), tag=LIVE)).process({**row, "output_stem": "b"})
    with pytest.raises(LeaseLost):
        Fenced(dst, mine).write("c", b"x")
    with pytest.raises(LeaseLost):
        Fenced(dst, mine).delete("a.png")
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c").exists() and (tmp_path / "a.png").exists()
    with pytest.raises(SetupError, match=f"stopped: another job .{DEAD}. holds DST"):
        mine.check()
    mine.release()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["owner"] == DEAD  # the other job's lease is left alone


# ------------------------------------------------------------------- (c) what is at the lock's name, and its fields
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_c_a_lock_that_is_a_fifo_or_a_link_is_refused_in_one_line(bicubic_weights, tmp_path, kind):
    src, dst = tmp_path / "in", tmp_path / "dst"
    _save(src / "a.png")
    dst.mkdir()
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"owner": DEAD, "host": "h", "pid": 1, "expires": 0}))
    if kind == "fifo":
        os.mkfifo(dst / LEASE_NAME)  # opening it would block until a writer comes: no job may hang on it
    else:
        (dst / LEASE_NAME).symlink_to(target)
    out = _cli("upscale", str(src), str(dst), "--local", "--weights", bicubic_weights)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    what = "a named pipe (FIFO)" if kind == "fifo" else "a symbolic link"
    assert lines[0].startswith(f"pidray upscale: error: DST {dst} cannot be used: {LEASE_NAME} in it is {what}"), lines
    assert "remove it" in lines[0] and "Errno" not in lines[0], lines
    assert sorted(p.name for p in dst.iterdir()) == [LEASE_NAME], "the job wrote into DST"
    assert json.loads(target.read_text())["owner"] == DEAD and (dst / LEASE_NAME).is_symlink() == (kind != "fifo")


@pytest.mark.parametrize("kind", ["directory", "dangling", "fifo-guard"])
def test_c_a_lock_that_is_a_folder_or_a_dangling_link_is_refused_in_one_line(tmp_path, kind):
    dst = tmp_path / "dst"
    dst.mkdir()
    if kind == "directory":
        (dst / LEASE_NAME).mkdir()
        what = "a folder (directory)"
    elif kind == "dangling":
        (dst / LEASE_NAME).symlink_to(tmp_path / "nowhere")
        what = "a symbolic link"
    else:  # a stale lease, and a FIFO where the takeover's guard goes
        _lease(dst, owner=DEAD, pid=_dead_pid())
        os.mkfifo(dst / ".pidray-lock.takeover")
        what = "a named pipe (FIFO)"
    done: list = []

    def take():
        try:
            Lease(Location(str(dst))).acquire()
            done.append("taken")
        except SetupError as e:
            done.append(e)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout=10)
    assert done, "taking the lease hung"
    assert isinstance(done[0], SetupError), done
    message = str(done[0])
    assert "\n" not in message and f"in it is {what}" in message and "Errno" not in message, message


def test_c_lease_fields_are_printed_escaped_and_cut_short(bicubic_weights, tmp_path, capsys):
    src, dst = tmp_path / "in", tmp_path / "dst"
    _save(src / "a.png")
    _lease(dst, owner=LIVE, host=ESCAPES + "h" * 5000, pid=1, expires=time.time() + 100)  # another host: live
    with pytest.raises(SetupError, match=f"in use by another pidray job {LIVE}") as refused:
        run_job(_job(src, dst, bicubic_weights))
    message = str(refused.value)
    assert not any(c in message for c in "\x1b\x07\x9b\u202e"), repr(message)
    assert "\\x1b[2J\\x1b]52;c;" in message and "\\x07" in message and len(message) < 500, message
    # a lost lease names the job that holds DST now: escaped too
    _lease(dst, owner=ESCAPES + "x" * 5000)
    with pytest.raises(LeaseLost) as lost:
        check_lease(Location(str(dst)), LIVE)
    assert not any(c in str(lost.value) for c in "\x1b\x07\x9b\u202e") and len(str(lost.value)) < 300
    # a lease whose owner is not a job id is stale: taken over, and nothing of it is printed
    _lease(dst, owner=ESCAPES, host=ESCAPES, pid=os.getpid())
    assert run_job(_job(src, dst, bicubic_weights)).ok == 1
    err = capsys.readouterr().err
    assert "took over DST's lease from a lease file" in err and not any(c in err for c in "\x1b\x07\x9b\u202e")


EXPIRIES = ["NaN", "Infinity", "-Infinity", "1e300", "1e999", "-1", "true", "false", '"9999999999"', "null",
            str(10**30), "[1]", '{"a": 1}']  # fmt: skip


def test_c_an_expiry_that_is_no_time_makes_the_lease_stale(tmp_path):
    dst = tmp_path / "dst"
    for raw in EXPIRIES:  # this host, this (live) process: only the expiry can make these stale
        _lease(dst, raw_expires=raw)
        lease = Lease(Location(str(dst)))
        assert "cannot be read" in lease.stale(lease.parse((dst / LEASE_NAME).read_bytes())), raw
        lease.acquire()
        assert lease.took_over and lease.taken_over == "", raw  # nothing trustworthy: no temporaries of it go
        lease.release()
        assert not (dst / LEASE_NAME).exists()
    _lease(dst)  # a lease that checks out, held by a live process: still refused
    with pytest.raises(SetupError, match=f"in use by another pidray job {LIVE}"):
        Lease(Location(str(dst))).acquire()


def test_c_a_nan_expiry_does_not_lock_dst_forever(bicubic_weights, tmp_path, capsys):
    src, dst = tmp_path / "in", tmp_path / "dst"
    _save(src / "a.png")
    _lease(dst, raw_expires="NaN")  # held by this live process, with an expiry that is no time
    assert run_job(_job(src, dst, bicubic_weights)).ok == 1
    err = capsys.readouterr().err
    said = "took over DST's lease from a lease file, which was stale (it cannot be read: its expiry is not a time)"
    assert said in err
    assert not (dst / LEASE_NAME).exists()


def test_b_the_lease_timings_are_set_from_the_environment_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PIDRAY_LEASE_TTL_S", "3")
    monkeypatch.setenv("PIDRAY_LEASE_RENEW_S", "0.5")
    lease = Lease(Location(str(tmp_path)))
    assert (lease.ttl, lease.every) == (3.0, 0.5)
    monkeypatch.delenv("PIDRAY_LEASE_RENEW_S")
    assert Lease(Location(str(tmp_path))).every == 3 / 8  # eight beats a lease
    for bad in ("nan", "inf", "-1", "0", "1e9", "\x1b[2J"):
        monkeypatch.setenv("PIDRAY_LEASE_TTL_S", bad)
        with pytest.raises(SetupError, match="PIDRAY_LEASE_TTL_S=.* is not a number of seconds") as e:
            Lease(Location(str(tmp_path)))
        assert "\x1b" not in str(e.value)


def test_a_pid_is_asked_only_in_the_namespace_that_gave_it(tmp_path):
    """A lease written by a job in another pid namespace on a host of the same name (a container, a pod on the
    host's network): its pid means nothing here, so a pid that is gone here does not make it stale."""
    dst = tmp_path / "dst"
    _lease(dst, owner=DEAD, pid=_dead_pid(), ns="another-boot:4026531836")
    lease = Lease(Location(str(dst)))
    with pytest.raises(SetupError, match="in use by another pidray job"):
        lease.acquire()
    _lease(dst, owner=DEAD, pid=_dead_pid())  # this namespace: its process is gone, stale
    lease.acquire()
    lease.release()


def test_an_unreadable_lease_removes_no_temporaries(tmp_path):
    """A lease that names a job id but whose expiry cannot be read is stale, yet says nothing trustworthy about that
    job: its temporaries stay."""
    dst = tmp_path / "dst"
    _lease(dst, raw_expires="NaN", owner=DEAD)
    part = dst / f".pidray-{DEAD}-abcd1234.part"
    part.write_bytes(b"someone's")
    lease = Lease(Location(str(dst)))
    lease.acquire()
    assert lease.took_over and lease.taken_over == "" and part.exists()
    lease.release()
