"""--resume keeps, and --overwrite replaces, only what a pidray job is known to have written: the input's row of DST's
manifest (with the writing job's id and the size written) or the job's receipt, for a regular file of that size.
A user's file, a file that appeared mid-job, a link, a FIFO, another job's output in a nested DST: each fails its
input with the reason and is left exactly as it was. Also: FIFOs and device links in SRC are on record, never
opened; a folder manifest with a damaged part keeps every good part's rows and backs the bad one up."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_noclobber import USER, _appear_before_write, _bucket, _job, _rows, _save, _src

from jobs.manifest import MANIFEST_NAME, read_manifest
from jobs.pipeline import run_job
from pipeline.storage import Location, S3Settings

from conftest import ROOT


def _snapshot(root) -> dict[str, tuple]:
    """Every entry below `root` (links not followed): what it is and what it holds."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[p] = ("file", open(p, "rb").read())
            else:
                out[p] = ("other", st.st_mode)
    return out


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pidray.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)  # fmt: skip


def test_resume_never_adopts_a_users_file_and_overwrite_then_keeps_it(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path), tmp_path / "out"
    dst.mkdir()
    (dst / "a.png").write_bytes(USER)  # the user's notes, at a.png's output name
    first = run_job(_job(src, dst, bicubic_weights, resume=True))
    assert (first.ok, first.skipped, first.failed) == (1, 0, 1)
    a = _rows(dst)["a.png"]
    assert a["status"] == "failed" and a["error_kind"] == "exists" and a["output_key"] == "" and not a["written_by"]
    assert "not written by pidray" in a["error"] and "--resume does not keep it" in a["error"]
    again = run_job(_job(src, dst, bicubic_weights, overwrite=True))
    assert again.failed == 1 and (dst / "a.png").read_bytes() == USER
    assert "--overwrite does not replace it" in _rows(dst)["a.png"]["error"]
    assert run_job(_job(src, dst, bicubic_weights, resume=True)).failed == 1 and (dst / "a.png").read_bytes() == USER


def test_a_file_that_appeared_mid_job_is_never_adopted(bicubic_weights, tmp_path, monkeypatch):
    src, dst = _src(tmp_path), tmp_path / "out"
    _appear_before_write(monkeypatch, "a.png", lambda loc: (dst / "a.png").write_bytes(USER))
    assert run_job(_job(src, dst, bicubic_weights)).failed == 1
    monkeypatch.undo()
    resumed = run_job(_job(src, dst, bicubic_weights, resume=True))
    assert (resumed.skipped, resumed.failed) == (1, 1)  # b.png: pidray's, kept; a.png: the user's, not adopted
    rows = _rows(dst)
    assert rows["b.png"]["status"] == "ok" and rows["b.png"]["written_by"]
    assert rows["a.png"]["status"] == "failed" and rows["a.png"]["output_key"] == ""
    assert run_job(_job(src, dst, bicubic_weights, overwrite=True)).failed == 1
    assert (dst / "a.png").read_bytes() == USER


def test_a_changed_output_and_a_link_at_an_output_name_are_not_pidrays(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path, ("a.png", "b.png", "c.png")), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 3
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    theirs = elsewhere / "mine.png"
    theirs.write_bytes((dst / "a.png").read_bytes())  # same bytes, same size: a link to it is still not pidray's
    (dst / "a.png").unlink()
    (dst / "a.png").symlink_to(theirs)
    (dst / "b.png").write_bytes(USER)  # the user wrote over pidray's output
    before = _snapshot(tmp_path / "elsewhere")
    resumed = run_job(_job(src, dst, bicubic_weights, resume=True))
    assert (resumed.skipped, resumed.failed) == (1, 2)
    rows = _rows(dst)
    assert "not a regular file" in rows["a.png"]["error"] and "changed since" in rows["b.png"]["error"]
    assert rows["c.png"]["status"] == "ok" and "done by an earlier run" in rows["c.png"]["notes"]
    over = run_job(_job(src, dst, bicubic_weights, overwrite=True))
    assert (over.ok, over.failed) == (1, 2)
    assert os.path.islink(dst / "a.png") and (dst / "b.png").read_bytes() == USER and _snapshot(elsewhere) == before


def test_another_jobs_output_in_a_nested_dst_is_not_adopted(bicubic_weights, tmp_path):
    outer_src = tmp_path / "in1"
    _save(outer_src / "sub" / "x.png", color=(250, 0, 0))
    inner_src = tmp_path / "in2"
    _save(inner_src / "x.png", color=(0, 0, 250))  # another image, same name
    dst = tmp_path / "out"
    assert run_job(_job(inner_src, dst / "sub", bicubic_weights)).ok == 1  # the inner job: DST out/sub
    blue = (dst / "sub" / "x.png").read_bytes()
    outer = run_job(_job(outer_src, dst, bicubic_weights, resume=True))
    assert outer.failed == 1 and outer.skipped == 0
    row = _rows(dst)["sub/x.png"]
    assert row["status"] == "failed" and "not written by pidray" in row["error"]
    assert run_job(_job(outer_src, dst, bicubic_weights, overwrite=True)).failed == 1
    assert (dst / "sub" / "x.png").read_bytes() == blue


def test_a_crash_before_the_manifest_keeps_outputs_by_their_receipts(bicubic_weights, tmp_path):
    """SIGKILL before any manifest part: the outputs' receipts prove them; a forged receipt line, a receipt for a
    size that differs, and junk lines prove nothing."""
    src, dst = _src(tmp_path, ("a.png", "b.png", "c.png")), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 3
    receipts = [p for p in os.listdir(dst) if p.startswith(".pidray-written-")]
    assert receipts == []  # the job's manifest is in DST: its receipts are gone
    # as a crash leaves it: outputs and their receipt, no manifest
    (dst / MANIFEST_NAME).unlink()
    job = "0123456789ab"
    sizes = {k: (dst / k).stat().st_size for k in ("a.png", "b.png", "c.png")}
    lines = [f'{{"key": "a.png", "size": {sizes["a.png"]}}}', f'{{"key": "b.png", "size": {sizes["b.png"] + 1}}}',
             "not json", '{"key": ["c.png"], "size": 1}', '{"key": "../../etc/passwd", "size": 1}']  # fmt: skip
    (dst / f".pidray-written-{job}-4242").write_text("\n".join(lines) + "\n")
    (dst / ".pidray-written-*-1").write_text(f'{{"key": "c.png", "size": {sizes["c.png"]}}}\n')  # not a name we make
    resumed = run_job(_job(src, dst, bicubic_weights, resume=True))
    rows = _rows(dst)
    assert rows["a.png"]["status"] == "ok" and rows["a.png"]["written_by"] == job
    assert rows["a.png"]["out_h"] == 40  # its size read from the file's header
    assert rows["b.png"]["status"] == "failed" and rows["c.png"]["status"] == "failed"
    assert (resumed.skipped, resumed.failed) == (1, 2)
    assert run_job(_job(src, dst, bicubic_weights, resume=True)).skipped == 1  # the proof was carried into the manifest


def test_sigkill_mid_job_then_resume_keeps_every_finished_output(bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    for i in range(16):
        # sizes apart: each image is a diffusion group of its own, written seconds after the one before (images of
        # one size land back to back, and a kill between an output's link and its receipt leaves it unproven)
        _save(src / f"p{i:02d}.png", color=(15 * i, 90, 200), size=(96 + 8 * i, 72))
    cmd = [sys.executable, "-m", "pidray.cli", "upscale", str(src), str(dst), "--local", "--weights", bicubic_weights]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 120

    def receipted() -> bool:  # an output is finished once it is in place and its receipt line follows it
        lines = "".join(p.read_text() for p in dst.glob(".pidray-written-*"))
        return any(f'"key": "{p.name}"' in lines for p in dst.glob("p*.png"))

    while time.time() < deadline and not (dst.is_dir() and receipted()):
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_ino for p in dst.glob("p*.png")}
    assert 0 < len(done) < 16  # (a manifest part is due only 15 s after a first row: usually none is there yet)
    out = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = _rows(dst)
    assert all(rows[k]["status"] == "ok" and "earlier run" in rows[k]["notes"] for k in done)
    assert all((dst / k).stat().st_ino == i for k, i in done.items())  # kept, not written again
    assert sum("earlier run" not in r["notes"] and r["status"] == "ok" for r in rows.values()) == 16 - len(done)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifos_at_output_names_and_in_src_never_hang(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path, ("a.png", "b.png", "c.png")), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 3
    (dst / "a.png").unlink()
    os.mkfifo(dst / "a.png")  # a FIFO at an output name: reading it would block for ever
    os.mkfifo(src / "pipe.png")  # and in SRC, one named like an image and one not
    os.mkfifo(src / "pipe")
    (src / "zero.png").symlink_to("/dev/zero")
    out = _cli("upscale", str(src), str(dst), "--local", "--weights", bicubic_weights, "--resume",
               "--follow-symlinks", timeout=120)  # fmt: skip
    assert out.returncode == 3, (out.returncode, out.stderr)
    rows = _rows(dst)
    assert rows["a.png"]["status"] == "failed" and "not a regular file" in rows["a.png"]["error"]
    for key in ("pipe.png", "pipe"):
        assert rows[key]["status"] == "skipped" and "named pipe" in rows[key]["error"], rows[key]
    assert rows["zero.png"]["status"] == "skipped" and "/dev/zero" in rows["zero.png"]["error"]
    assert (rows["b.png"]["status"], rows["c.png"]["status"]) == ("ok", "ok")


def test_a_damaged_part_of_a_manifest_folder_loses_only_its_own_rows(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path, ("a.png", "b.png", "c.png")), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 3
    single = (dst / MANIFEST_NAME).read_bytes()  # as a folder: the good part, then a junk one
    (dst / MANIFEST_NAME).unlink()
    (dst / MANIFEST_NAME).mkdir()
    (dst / MANIFEST_NAME / "part-000000-aaaa.parquet").write_bytes(single)
    junk = b"PAR1 this part was cut off by a full disk" * 10
    (dst / MANIFEST_NAME / "part-000001-bbbb.parquet").write_bytes(junk)
    out = _cli("upscale", str(src), str(dst), "--local", "--weights", bicubic_weights, "--resume")
    assert out.returncode == 0, out.stderr
    assert "1 of its 2 parts cannot be used" in out.stderr and "part-000001-bbbb.parquet" in out.stderr
    rows = _rows(dst)
    assert len(rows) == 3 and all(r["status"] == "ok" and r["written_by"] for r in rows.values())
    backups = [p for p in os.listdir(dst) if p.startswith(f"{MANIFEST_NAME}.bad-")]
    assert len(backups) == 1 and (dst / backups[0]).is_dir(), os.listdir(dst)
    assert (dst / backups[0] / "part-000001-bbbb.parquet").read_bytes() == junk
    assert not (dst / backups[0] / "part-000000-aaaa.parquet").exists()  # the good part's rows live on in the new one
    assert pq.read_table(dst / MANIFEST_NAME).num_rows == 3


@pytest.mark.slow
def test_s3_resume_keeps_only_objects_a_job_wrote_here(s3_server, bicubic_weights, tmp_path):
    """On S3 the proof is the object's own metadata (the job's id and its key in DST): an object put by a user, or
    by a job whose DST is nested below, is not adopted even when no manifest is left."""
    s3 = _bucket(s3_server, "proof")
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    src = _src(tmp_path, ("a.png", "b.png", "c.png"))
    _save(tmp_path / "inner" / "x.png", color=(0, 0, 250))
    _save(src / "sub" / "x.png", color=(250, 0, 0))
    assert run_job(_job(tmp_path / "inner", "s3://proof/out/sub", bicubic_weights, s3=settings)).ok == 1
    s3.put_object(Bucket="proof", Key="out/c.png", Body=USER)
    dst = Location("s3://proof/out", settings)
    first = run_job(_job(src, dst.uri, bicubic_weights, s3=settings))
    assert (first.ok, first.failed) == (2, 2)
    s3.delete_object(Bucket="proof", Key=f"out/{MANIFEST_NAME}")  # the record is lost: the objects still prove it
    resumed = run_job(_job(src, dst.uri, bicubic_weights, s3=settings, resume=True))
    rows = _rows(dst)
    assert rows["a.png"]["status"] == "ok" and rows["b.png"]["status"] == "ok"
    assert rows["c.png"]["status"] == "failed" and rows["sub/x.png"]["status"] == "failed"
    assert resumed.failed == 2
    assert s3.get_object(Bucket="proof", Key="out/c.png")["Body"].read() == USER
    inner = Image.open(__import__("io").BytesIO(s3.get_object(Bucket="proof", Key="out/sub/x.png")["Body"].read()))
    assert inner.convert("RGB").getpixel((5, 5))[2] > 200  # still the inner job's blue image
    assert read_manifest(Location("s3://proof/out/sub", settings))[0]["status"] == "ok"


def test_a_resumed_job_keeps_its_history(bicubic_weights, tmp_path):
    """After --resume the manifest and `pidray status` describe the whole job: inputs done by the earlier run stay
    `ok`, with their timings and sizes, and the run's summary says they were done earlier."""
    src, dst = _src(tmp_path, ("a.png", "b.png", "c.png")), tmp_path / "out"
    first = _cli("upscale", str(src), str(dst), "--local", "--weights", bicubic_weights)
    assert first.returncode == 0, first.stderr
    before = _rows(dst)
    (dst / "c.png").unlink()
    again = _cli("upscale", str(src), str(dst), "--local", "--weights", bicubic_weights, "--resume")
    assert again.returncode == 0, again.stderr
    assert "1 ok, 0 failed, 2 skipped (2 done by an earlier run)" in again.stdout + again.stderr
    rows = _rows(dst)
    for k in ("a.png", "b.png"):
        assert rows[k]["status"] == "ok" and "done by an earlier run" in rows[k]["notes"]
        assert rows[k]["t_diffuse"] == before[k]["t_diffuse"] and rows[k]["out_h"] == before[k]["out_h"]
    assert rows["c.png"]["status"] == "ok" and "earlier run" not in rows["c.png"]["notes"]
    status = _cli("status", str(dst))
    assert "3 rows (3 ok, 0 failed, 0 skipped, 0 interrupted)" in status.stdout, status.stdout
    third = _cli("upscale", str(src), str(dst), "--local", "--weights", bicubic_weights, "--resume")
    assert _rows(dst)["a.png"]["notes"].count("done by an earlier run") == 1, third.stderr


def test_a_manifest_of_an_older_pidray_proves_only_images_of_the_size_it_recorded(bicubic_weights, tmp_path):
    """Rows without the size written (an older pidray's manifest, a damaged column): the output is proven only when
    its header shows the height and width the row records; a file the user wrote over it is not."""
    src, dst = _src(tmp_path, ("a.png", "b.png")), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 2
    table = pq.read_table(dst / MANIFEST_NAME).drop_columns(["written_by", "out_bytes"])
    pq.write_table(table, dst / MANIFEST_NAME)
    (dst / "a.png").write_bytes(b"USER EDIT")
    over = run_job(_job(src, dst, bicubic_weights, overwrite=True))
    assert (over.ok, over.failed) == (1, 1) and (dst / "a.png").read_bytes() == b"USER EDIT"
    assert "changed since a pidray job wrote it" in _rows(dst)["a.png"]["error"]
    assert _rows(dst)["b.png"]["out_bytes"] == (dst / "b.png").stat().st_size  # its proof, whole again


def test_overwrite_keeps_a_file_changed_after_the_job_was_planned(bicubic_weights, tmp_path, monkeypatch):
    src, dst = _src(tmp_path), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 2

    def change(loc):
        (dst / "a.png").write_bytes(USER)  # the user's edit lands between planning and the write

    _appear_before_write(monkeypatch, "a.png", change)
    over = run_job(_job(src, dst, bicubic_weights, overwrite=True))
    assert (over.ok, over.failed) == (1, 1) and (dst / "a.png").read_bytes() == USER
    assert "changed in DST after the job was planned" in _rows(dst)["a.png"]["error"]


def test_a_renamed_input_leaves_an_older_row_that_does_not_block_overwrite(bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    _save(src / "x.png", color=(200, 0, 0))
    assert run_job(_job(src, dst, bicubic_weights)).ok == 1
    (src / "x.png").unlink()
    Image.new("RGB", (14, 9), (0, 200, 0)).save(src / "x.tif")  # the same output name, another input
    from dataclasses import replace

    from pipeline.stages import UpscaleOptions

    for _ in range(2):
        cfg = replace(_job(src, dst, bicubic_weights, overwrite=True), options=UpscaleOptions(format="png"))
        again = run_job(cfg)
        assert again.ok == 1, _rows(dst)
    assert Image.open(dst / "x.png").size == (56, 36)


def test_a_sparse_damaged_manifest_is_moved_aside_and_foreign_files_in_its_folder_stay(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path), tmp_path / "out"
    dst.mkdir()
    with open(dst / MANIFEST_NAME, "wb") as f:  # 300 MB that take no disk: never read, never copied
        f.truncate(300 << 20)
    out = _cli("upscale", str(src), str(dst), "--local", "--weights", bicubic_weights)
    assert out.returncode == 0, out.stderr
    backup = next(p for p in dst.iterdir() if p.name.startswith(f"{MANIFEST_NAME}.bad-"))
    assert backup.stat().st_size == 300 << 20 and backup.stat().st_blocks == 0  # moved, not copied
    # a manifest folder holding a file of the user's: the manifest goes in it as a part, and the file stays
    other = tmp_path / "other"
    (other / MANIFEST_NAME).mkdir(parents=True)
    (other / MANIFEST_NAME / "README.txt").write_text("mine")
    again = _cli("upscale", str(src), str(other), "--local", "--weights", bicubic_weights)
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr
    assert (other / MANIFEST_NAME / "README.txt").read_text() == "mine" and len(_rows(other)) == 2


def test_in_place_resume_after_a_crash_knows_its_outputs_by_their_receipts(bicubic_weights, tmp_path, monkeypatch):
    d = tmp_path / "d"
    _save(d / "p.png", color=(200, 0, 0))
    _save(d / "q.png", color=(0, 200, 0))
    monkeypatch.setattr("jobs.pipeline.receipts.remove", lambda dst, job: None)  # as a crash leaves DST
    assert run_job(_job(d, d, bicubic_weights, in_place=True, suffix="_x4")).ok == 2
    monkeypatch.undo()
    (d / MANIFEST_NAME).unlink()
    plan = run_job(_job(d, d, bicubic_weights, in_place=True, suffix="_x4", resume=True, dry_run=True))
    rows = {r["key"]: r for r in plan.rows}
    assert rows["p_x4.png"]["status"] == "skipped" and "earlier in-place run" in rows["p_x4.png"]["error"]
    assert rows["p.png"]["status"] == "ok" and plan.planned == 0, rows
