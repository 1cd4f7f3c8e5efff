"""`pidray upscale SRC DST --dataset webdataset|parquet` through the real command: shards and tables made from the
bundled sample photos (jpg, png, grayscale, a broken image, a sample without an image, captions, JSON metadata, extra
columns), read back with pidray's own readers (and Ray Data's, slow); the caption reaching a tiny real-class Gemma;
SIGINT mid-shard then --resume; a second job into the same DST; hostile names; the one-line refusals."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_datasets import make_tar

from jobs.manifest import read_manifest
from pipeline.datasets import ShardReader, TableReader
from pipeline.storage import Location

from conftest import ROOT

SAMPLES = ROOT / "pipeline" / "assets" / "samples"


def pidray(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pidray", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=timeout)  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    return out


def photo(name: str, side: int = 24, mode: str | None = None, fmt: str | None = None) -> bytes:
    im = Image.open(SAMPLES / name)
    im = im.convert(mode) if mode else im
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, fmt or ("PNG" if name.endswith(".png") or mode == "L" else "JPEG"))
    return buf.getvalue()


def members() -> list[tuple[str, bytes]]:
    coffee = photo("coffee.jpg")
    return [
        ("coffee.jpg", coffee), ("coffee.txt", b"a cup of coffee\n"), ("coffee.json", b'{"caption": "cup", "w": 9}'),
        ("chelsea.png", photo("chelsea.png")), ("chelsea.json", b'{"caption": "a cat"}'),
        ("gray.png", photo("astronaut.png", mode="L")), ("gray.cls", b"3"),
        ("broken.jpg", coffee[: len(coffee) // 2]), ("broken.txt", b"half"),
        ("noimage.txt", b"no picture"),
    ]  # fmt: skip


def rows_by_key(dst: Path) -> dict[str, dict]:
    rows = read_manifest(Location(str(dst)))
    by = {r["key"]: r for r in rows}
    assert len(by) == len(rows), "one row per sample, none twice"
    return by


def leftovers(dst: Path) -> list[str]:
    return [p.name for p in dst.rglob("*") if p.name.endswith(".part") or p.name.startswith(".pidray-written")]


def test_webdataset_shards_in_and_out(tmp_path):
    """Shards of the same names (a sub-folder kept), each kept sample's members in order and byte for byte, its image
    upscaled; the failed ones left out and recorded with their reasons; a row per sample with its caption and one
    per shard with the proof; the format recognised and said in one line."""
    src, dst = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    ms = members()
    (src / "00000.tar").write_bytes(make_tar(ms))
    (src / "sub" / "00001.tar").write_bytes(make_tar(ms[:3]))
    out = pidray("upscale", src, dst, "--device", "cpu", "--format", "png")
    assert out.returncode == 3, out.stderr  # some samples failed: listed, the job went on
    said = [line for line in out.stderr.splitlines() if "--dataset webdataset" in line]
    assert len(said) == 1 and "only .tar files" in said[0], out.stderr
    got = list(ShardReader(open(dst / "00000.tar", "rb"), "00000.tar"))
    assert [s.key for s in got] == ["coffee", "chelsea", "gray"]
    assert [e for e, _ in got[0].members] == ["png", "txt", "json"] and got[0].caption == "a cup of coffee"
    assert got[0].members[1:] == [(n.split(".")[1], d) for n, d in ms[1:3]] and got[2].members[1] == ("cls", b"3")
    for s, side in zip(got, (24, 24, 24)):
        assert max(Image.open(io.BytesIO(s.image)).size) == side * 4
    assert Image.open(io.BytesIO(got[2].image)).mode == "L"
    assert [s.key for s in ShardReader(open(dst / "sub" / "00001.tar", "rb"), "x")] == ["coffee"]
    rows = rows_by_key(dst)
    assert rows["00000.tar#coffee"]["status"] == "ok" and rows["00000.tar#coffee"]["caption"] == "a cup of coffee"
    assert rows["00000.tar#coffee"]["output_key"] == "00000.tar"
    assert rows["00000.tar#broken"]["status"] == "failed" and "decode" in rows["00000.tar#broken"]["error"]
    assert "no image member" in rows["00000.tar#noimage"]["error"]
    shard = rows["00000.tar"]
    assert shard["written_by"] and shard["out_bytes"] == (dst / "00000.tar").stat().st_size
    assert set(rows) == {"00000.tar", "sub/00001.tar", "sub/00001.tar#coffee",
                         *(f"00000.tar#{k}" for k in ("coffee", "chelsea", "gray", "broken", "noimage"))}  # fmt: skip
    assert leftovers(dst) == []


def test_json_caption_and_an_image_key(tmp_path):
    src, dst = tmp_path / "s.tar", tmp_path / "out"
    src.write_bytes(make_tar(members()[:5]))
    out = pidray("upscale", src, dst, "--dataset", "webdataset", "--device", "cpu", "--caption-key", "json:caption",
                 "--image-key", "png", "--no-progress")  # fmt: skip
    assert out.returncode == 3, out.stderr  # coffee has no png member: it fails, with its reason
    rows = rows_by_key(dst)
    assert rows["s.tar#chelsea"]["caption"] == "a cat" and rows["s.tar#chelsea"]["status"] == "ok"
    assert "looked for png" in rows["s.tar#coffee"]["error"]
    assert [s.key for s in ShardReader(open(dst / "s.tar", "rb"), "s.tar")] == ["chelsea"]


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def make_table(path: Path, n_groups: int = 2) -> pa.Table:
    images = [
        {"bytes": photo("coffee.jpg"), "path": "a/coffee.jpg"},
        None,
        {"bytes": photo("chelsea.png"), "path": "chelsea.png"},
        {"bytes": b"not an image", "path": "x.png"},
    ]
    table = pa.table({"id": [1, 2, 3, 4], "image": pa.array(images, IMAGE),
                      "text": ["a cup of coffee", None, "a cat", "junk"],
                      "tags": pa.array([["x"], [], ["y", "z"], None], pa.list_(pa.string()))})  # fmt: skip
    pq.write_table(table, path, row_group_size=max(1, 4 // n_groups))
    return table


def test_parquet_tables_keep_schema_rows_and_columns(tmp_path):
    """The same schema, rows in order, every other column identical; the image column upscaled (a struct's path
    takes the output extension), a failed row kept with a null image; the caption column used."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    table = make_table(src / "train-0.parquet")
    make_table(src / "train-1.parquet", n_groups=1)
    out = pidray("upscale", src, dst, "--device", "cpu", "--caption-column", "text", "-f", "png", "--no-progress")
    assert out.returncode == 3, out.stderr
    assert "only .parquet files" in out.stderr and "--dataset parquet" in out.stderr
    for name in ("train-0.parquet", "train-1.parquet"):
        back = pq.read_table(dst / name)
        assert back.schema.equals(table.schema, check_metadata=False)
        assert back.drop(["image"]).equals(table.drop(["image"]))
        cells = back.column("image").to_pylist()
        assert cells[1] is None and cells[3] is None
        assert cells[0]["path"] == "a/coffee.png" and cells[2]["path"] == "chelsea.png"
        assert Image.open(io.BytesIO(cells[0]["bytes"])).size[0] == 24 * 4
        samples = list(TableReader(str(dst / name), name, "image", "text"))
        assert [s.ok for s in samples] == [True, False, True, False]
    rows = rows_by_key(dst)
    assert rows["train-0.parquet#0"]["caption"] == "a cup of coffee" and rows["train-0.parquet#0"]["status"] == "ok"
    assert rows["train-0.parquet#1"]["status"] == "failed" and "null" in rows["train-0.parquet#1"]["error"]
    assert rows["train-0.parquet#3"]["status"] == "failed"
    assert leftovers(dst) == []


def test_refused_in_one_line_before_anything_runs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_table(src / "t.parquet")
    pq.write_table(pa.table({"image": pa.array([b"x"]), "n": [1]}), src / "u.parquet")
    (tmp_path / "c.csv").write_text("key,caption\nt.parquet#0,a cup\n")
    cases = [
        ([], "the tables do not share one schema: in u.parquet"),
        (["--caption-column", "caption"], "no column 'caption'; its columns are: id, image, text, tags"),
        (["--captions", tmp_path / "c.csv"], "--captions is for a job over image files"),
        (["--suffix", "_x"], "--suffix is for a job over image files"),
    ]
    for flags, message in cases:
        if flags:
            (src / "u.parquet").unlink(missing_ok=True)
        out = pidray("upscale", src, tmp_path / "out", "--device", "cpu", *flags)
        assert out.returncode == 2 and message in out.stderr, (flags, out.stderr)
        assert len([line for line in out.stderr.splitlines() if "error" in line]) == 1, out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_second_job_into_the_same_dst_and_files_it_did_not_write(tmp_path):
    """Without --resume/--overwrite: one line, exit 2, nothing touched; --resume keeps the shard (not rewritten);
    --overwrite redoes it; a file pidray did not write at a shard's output name is never replaced."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "a.tar").write_bytes(make_tar(members()[:3]))
    (src / "b.tar").write_bytes(make_tar(members()[3:5]))
    dst.mkdir()
    (dst / "b.tar").write_bytes(b"mine")
    first = pidray("upscale", src, dst, "--device", "cpu", "--no-progress")
    assert first.returncode == 3 and "not written by pidray" in first.stderr, first.stderr
    assert (dst / "b.tar").read_bytes() == b"mine"
    before = (dst / "a.tar").stat()
    again = pidray("upscale", src, dst, "--device", "cpu")
    assert again.returncode == 2 and "already holds this job's outputs" in again.stderr and "a.tar" in again.stderr
    resumed = pidray("upscale", src, dst, "--device", "cpu", "--resume", "--no-progress")
    assert resumed.returncode == 3 and "done by an earlier run" in resumed.stdout, resumed.stdout + resumed.stderr
    assert (dst / "a.tar").stat().st_ino == before.st_ino and (dst / "b.tar").read_bytes() == b"mine"
    assert rows_by_key(dst)["a.tar#coffee"]["status"] == "ok"  # carried over
    redo = pidray("upscale", src, dst, "--device", "cpu", "--overwrite", "--no-progress")
    assert redo.returncode == 3 and (dst / "a.tar").stat().st_ino != before.st_ino
    assert (dst / "b.tar").read_bytes() == b"mine" and leftovers(dst) == []


def test_hostile_names_stay_inside_dst(tmp_path):
    """Members named `../x`, `/etc/x`, links: their samples fail; odd and hidden shard names; nothing outside DST."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    link = tarfile.TarInfo("evil.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    good = photo("coffee.jpg")
    bad = [("../up.jpg", good), ("/etc/abs.jpg", good), (link, b""), ("ok.jpg", good), ("ok.txt", b"fine")]
    (src / "we ird 'é'.tar").write_bytes(make_tar(bad, fmt=tarfile.PAX_FORMAT))
    (src / ".hidden.tar").write_bytes(make_tar(bad))
    (src / "-rf.tar").write_bytes(b"this is not a tar file at all" * 40)
    out = pidray("upscale", src, dst, "--device", "cpu", "--no-progress")
    assert out.returncode == 3, out.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["_pidray_manifest.parquet", "we ird 'é'.tar"]
    kept = list(ShardReader(open(dst / "we ird 'é'.tar", "rb"), "x"))
    assert [s.key for s in kept] == ["ok"]
    rows = rows_by_key(dst)
    assert rows["-rf.tar"]["status"] == "failed" and "not a tar" in rows["-rf.tar"]["error"]
    assert sum(r["status"] == "failed" for k, r in rows.items() if k.startswith("we ird")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_fifos_and_links_named_as_shards_are_never_opened(tmp_path):
    """A named pipe called `x.tar` (whose open would wait for a writer forever) and, without --follow-symlinks, a link
    to a shard: neither is read; the real shard is done and the job ends."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "00000.tar").write_bytes(make_tar([("a.jpg", photo("coffee.jpg", 16))]))
    os.mkfifo(src / "00001.tar")
    (src / "00002.tar").symlink_to(src / "00000.tar")
    out = pidray("upscale", src, dst, "--device", "cpu", "--no-progress", timeout=240)
    assert out.returncode == 3, out.stderr
    rows = rows_by_key(dst)
    assert rows["00000.tar#a"]["status"] == "ok" and "00002.tar" not in {k.split("#")[0] for k in rows}
    assert rows["00001.tar"]["status"] == "failed" and "named pipe" in rows["00001.tar"]["error"], rows
    assert sorted(p.name for p in dst.iterdir()) == ["00000.tar", "_pidray_manifest.parquet"]


def resume_keeps_the_first_and_does_the_second(src: Path, dst: Path) -> dict[str, dict]:
    """--resume after a run cut off in shard 00001: 00000.tar kept as it is (not rewritten), 00001.tar done whole;
    the manifest's rows by key."""
    inode = (dst / "00000.tar").stat().st_ino
    out = pidray("upscale", src, dst, "--device", "cpu", "-t", "1024", "--resume", "--no-progress", timeout=600)
    assert out.returncode == 0, out.stderr
    assert (dst / "00000.tar").stat().st_ino == inode
    assert [s.key for s in ShardReader(open(dst / "00001.tar", "rb"), "x")] == list("bcdef")
    return rows_by_key(dst)


def test_sigint_mid_shard_then_resume(tmp_path):
    """Ctrl-C while a shard is being done: exit 130, the shard done before it stands, nothing of the cut-off shard
    is published (no temporary left); --resume keeps the first and does the second; every sample once, ok."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "00000.tar").write_bytes(make_tar([("a.jpg", photo("coffee.jpg", 16))]))
    big = [(f"{k}.png", photo("chelsea.png", 96)) for k in "bcdef"]
    (src / "00001.tar").write_bytes(make_tar(big))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pidray", "upscale", str(src), str(dst), "--device", "cpu", "-t", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("done    00000.tar") or not line:
                break
        assert lines[-1].startswith("done    00000.tar"), "".join(lines)
        time.sleep(2)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        err = "".join(lines) + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert rc == 130, (rc, err)
    assert "--resume" in err and "Traceback" not in err, err
    assert (dst / "00000.tar").is_file() and not (dst / "00001.tar").exists() and leftovers(dst) == []
    rows = rows_by_key(dst)
    assert rows["00000.tar#a"]["status"] == "ok"
    cut = [r["status"] for k, r in rows.items() if k.startswith("00001.tar")]
    assert cut and set(cut) == {"interrupted"}, rows  # its samples were in the stages; no row for the shard itself
    rows = resume_keeps_the_first_and_does_the_second(src, dst)
    assert {k: r["status"] for k, r in rows.items()} == {
        "00000.tar": "ok",
        "00000.tar#a": "ok",
        "00001.tar": "ok",
        **{f"00001.tar#{k}": "ok" for k in "bcdef"},
    }
    assert leftovers(dst) == []


def test_the_caption_reaches_the_caption_encoder(golden_dir, tmp_path):
    """A preset with a (tiny, real-class) Gemma caption encoder: the sample's txt caption and its JSON caption are
    different captions, so the same image with the same seed comes out different; each caption is in the manifest."""
    from test_undistilled import guided_stand_in

    from conftest import make_tiny_gemma

    gemma = make_tiny_gemma(tmp_path / "gemma")
    guided_stand_in("qwenimage-2kto4k-v1.5-undistilled", golden_dir, tmp_path / "q", gemma)
    src = tmp_path / "s.tar"
    src.write_bytes(make_tar([("a.png", photo("chelsea.png", 12)), ("a.txt", b"a red dog"),
                              ("a.json", b'{"caption": "busy city street"}')]))  # fmt: skip
    outs = {}
    for key in ("txt", "json:caption"):
        dst = tmp_path / key.replace(":", "_")
        out = pidray(
            "upscale",
            src,
            dst,
            "-m",
            tmp_path / "q" / "preset.json",
            "--weights",
            tmp_path / "q",
            "--text-encoder",
            gemma,
            "--steps",
            2,
            "--overlap",
            1,
            "--caption-key",
            key,
            "--no-progress",
        )
        assert out.returncode == 0, out.stderr
        outs[key] = next(iter(ShardReader(open(dst / "s.tar", "rb"), "s.tar"))).image
        assert rows_by_key(dst)["s.tar#a"]["caption"] == {"txt": "a red dog", "json:caption": "busy city street"}[key]
    assert outs["txt"] != outs["json:caption"]


@pytest.mark.slow
def test_ray_data_reads_the_outputs(tmp_path):
    import ray

    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "a.tar").write_bytes(make_tar(members()[:5]))
    make_table(src / "t.parquet")
    assert pidray("upscale", src / "a.tar", dst, "--device", "cpu", "--no-progress").returncode == 0
    assert pidray("upscale", src / "t.parquet", dst, "--device", "cpu", "--no-progress").returncode == 3
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        shards = ray.data.read_webdataset(str(dst / "a.tar"), decoder=None).take_all()
        assert [r["__key__"] for r in shards] == ["coffee", "chelsea"]
        assert json.loads(shards[0]["json"]) == {"caption": "cup", "w": 9}
        table = ray.data.read_parquet(str(dst / "t.parquet")).take_all()
        assert [r["id"] for r in table] == [1, 2, 3, 4] and table[1]["image"] is None
    finally:
        ray.shutdown()


def test_sigkill_mid_shard_then_resume(tmp_path):
    """SIGKILL (no handler runs) while a shard is half done: the shard published before it stands whole, nothing is
    at the cut-off shard's name (its temporary at most); --resume keeps the first (proven by its receipt, not
    rewritten; its row says its samples' rows may be lost), does the second, and clears the killed job's temporary:
    every sample once, ok."""
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "00000.tar").write_bytes(make_tar([("a.jpg", photo("coffee.jpg", 16))]))
    (src / "00001.tar").write_bytes(make_tar([(f"{k}.png", photo("chelsea.png", 96)) for k in "bcdef"]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pidray", "upscale", str(src), str(dst), "--device", "cpu", "-t", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        lines = []
        while line := proc.stderr.readline():
            lines.append(line)
            if line.startswith("done    00000.tar"):
                break
        deadline = time.monotonic() + 60  # the cut-off shard's temporary is there: it is being written
        while not list(dst.glob(".pidray-*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert [s.key for s in ShardReader(open(dst / "00000.tar", "rb"), "x")] == ["a"]
    assert not (dst / "00001.tar").exists() and leftovers(dst), sorted(p.name for p in dst.iterdir())
    rows = resume_keeps_the_first_and_does_the_second(src, dst)
    assert {k: r["status"] for k, r in rows.items() if k.startswith("00001.tar")} == {
        "00001.tar": "ok", **{f"00001.tar#{k}": "ok" for k in "bcdef"}}  # fmt: skip
    kept = rows["00000.tar"]  # its samples' rows may have died with the killed job: the shard's row says so
    assert kept["status"] == "ok" and "done by an earlier run" in kept["notes"]
    assert rows.get("00000.tar#a", {"status": "ok"})["status"] == "ok" and leftovers(dst) == []
