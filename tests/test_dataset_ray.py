"""`pidray upscale SRC DST --dataset ... --ray`: shards read, assembled and published by Ray actors on the workers,
their samples through the job's actor pools. On a real local Ray: the outputs are the local loop's byte for byte
(same seeds, same pixels, same order), for WebDataset shards and Parquet tables; a run cut off by SIGINT publishes
nothing half done and --resume on Ray finishes it. Fast: the bound on samples in flight and the stop, without Ray."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_dataset_job import leftovers, make_table, members, photo, rows_by_key
from test_datasets import make_tar

from jobs.dataset_ray import _Open, _Stop, _WorkerContext
from pidray.cli import main
from pipeline.datasets import ShardReader

from conftest import ROOT

SAME = ("status", "error", "error_kind", "caption", "output_key", "seed", "out_h", "out_w")  # equal in both runs


def upscale(src, dst, *flags) -> int:
    return main(["upscale", str(src), str(dst), "--device", "cpu", "--no-progress", *map(str, flags)])


def same_runs(local: Path, on_ray: Path, names: list[str]) -> None:
    """Every output byte for byte, and the same manifest rows (but where and when they ran)."""
    for name in names:
        assert (on_ray / name).read_bytes() == (local / name).read_bytes(), name
    a, b = rows_by_key(local), rows_by_key(on_ray)
    assert set(a) == set(b)
    for key in a:
        assert {k: a[key].get(k) for k in SAME} == {k: b[key].get(k) for k in SAME}, key
    assert leftovers(on_ray) == []


@pytest.mark.slow
def test_webdataset_shards_on_ray_are_the_local_loops_byte_for_byte(ray_local, tmp_path):
    """Three shards (one in a sub-folder; captions, JSON members, a broken image and a sample without one): the
    same shards, samples in input order, members byte for byte, failures with the same reasons."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    ms = members()
    (src / "00000.tar").write_bytes(make_tar(ms[:5]))
    (src / "sub" / "00001.tar").write_bytes(make_tar(ms[5:]))
    (src / "00002.tar").write_bytes(
        make_tar([(f"{k}.png", photo("chelsea.png", 12 + i)) for i, k in enumerate("pqrs")])
    )
    assert upscale(src, tmp_path / "local", "--local") == 3
    t0 = time.monotonic()
    assert upscale(src, tmp_path / "ray", "--ray") == 3  # some samples failed, as in the loop
    print(f"on Ray: {time.monotonic() - t0:.1f}s")
    names = ["00000.tar", "sub/00001.tar", "00002.tar"]
    same_runs(tmp_path / "local", tmp_path / "ray", names)
    out = tmp_path / "ray"
    assert [s.key for s in ShardReader(open(out / "00002.tar", "rb"), "x")] == list("pqrs")
    assert [s.key for s in ShardReader(open(out / "00000.tar", "rb"), "x")] == ["coffee", "chelsea"]
    rows = rows_by_key(out)
    assert rows["00000.tar#coffee"]["caption"] == "a cup of coffee" and rows["00002.tar"]["written_by"]
    assert "no image member" in rows["sub/00001.tar#noimage"]["error"]


@pytest.mark.slow
def test_parquet_tables_on_ray_are_the_local_loops_byte_for_byte(ray_local, tmp_path):
    """Two tables (row groups of one and of two rows, a null cell, a cell that is not an image): the same schema,
    rows and order, every other column; a failed row kept with a null image."""
    src = tmp_path / "src"
    src.mkdir()
    table = make_table(src / "a.parquet")
    make_table(src / "b.parquet", n_groups=1)
    assert upscale(src, tmp_path / "local", "--local", "--caption-column", "text") == 3
    assert upscale(src, tmp_path / "ray", "--ray", "--caption-column", "text") == 3
    same_runs(tmp_path / "local", tmp_path / "ray", ["a.parquet", "b.parquet"])
    back = pq.read_table(tmp_path / "ray" / "a.parquet")
    assert back.drop(["image"]).equals(table.drop(["image"]))
    assert [c is None for c in back.column("image").to_pylist()] == [False, True, False, True]


def two_shards(src: Path, n: int = 64) -> None:
    """A shard of one sample, and one of `n`: more than a shard has in flight, so it cannot be done at once."""
    src.mkdir()
    (src / "00000.tar").write_bytes(make_tar([("a.jpg", photo("coffee.jpg", 12))]))
    (src / "00001.tar").write_bytes(make_tar([(f"k{i:03d}.png", photo("chelsea.png", 16)) for i in range(n)]))


def check_cut_off(dst: Path, published: list[str]) -> None:
    """The shards published stand with their rows `ok`; nothing of the others is in DST (no temporary either), and
    their samples read so far are `interrupted`."""
    assert published == sorted(p.name for p in dst.glob("*.tar")) and "00000.tar" in published
    assert "00001.tar" not in published  # its many samples: still in the stages when the first shard was published
    assert leftovers(dst) == []
    rows = rows_by_key(dst)
    for shard in ("00000.tar", "00001.tar"):
        statuses = {r["status"] for k, r in rows.items() if k.startswith(shard + "#")}
        assert statuses == ({"ok"} if shard in published else {"interrupted"}), (shard, statuses)


@pytest.mark.slow
def test_ctrl_c_on_ray_publishes_nothing_half_done(tmp_path):
    """SIGINT to the CLI (on a Ray of its own) once a shard is published: exit 130, one line saying how to finish, no
    traceback; the published shard stands, nothing of the other is in DST."""
    src, dst = tmp_path / "src", tmp_path / "out"
    two_shards(src, 600)  # many times what is in flight: not all through the stages by the time SIGINT is answered
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pidray", "upscale", str(src), str(dst), "--device", "cpu", "--ray"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    timer = threading.Timer(240, proc.kill)
    timer.start()
    try:
        lines = []
        while line := proc.stderr.readline():
            lines.append(line)
            if line.startswith("done "):
                proc.send_signal(signal.SIGINT)
                break
        rc = proc.wait(timeout=120)
        err = "".join(lines) + proc.stderr.read()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert rc == 130 and "--resume" in err and "Traceback" not in err and "Error" not in err, (rc, err)
    said = sorted(line.split()[1].rstrip(":") for line in err.splitlines() if line.startswith("done "))
    check_cut_off(dst, said)


@pytest.mark.slow
def test_a_run_cut_off_on_ray_then_resume_on_ray(ray_local, tmp_path, monkeypatch):
    """Stopped as Ctrl-C stops it, once a shard is published (on the caller's Ray, which it leaves running); then
    --resume on Ray keeps the published shard (not rewritten) and does the other: every sample once, `ok`."""
    from jobs import dataset_ray
    from jobs.loop import Interrupted

    src, dst = tmp_path / "src", tmp_path / "out"
    two_shards(src)
    round_ = dataset_ray._Driver._round

    def cut(self, *args):
        round_(self, *args)
        if any(dst.glob("*.tar")):
            raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(dataset_ray._Driver, "_round", cut)
    monkeypatch.setattr(dataset_ray, "AT_ONCE_MAX", 1)  # the one-sample shard is started, and in the stages, first
    assert upscale(src, dst, "--ray") == 130
    monkeypatch.undo()
    check_cut_off(dst, ["00000.tar"])
    assert ray_local.is_initialized()
    inode = (dst / "00000.tar").stat().st_ino
    assert upscale(src, dst, "--ray", "--resume") == 0
    assert (dst / "00000.tar").stat().st_ino == inode
    assert [s.key for s in ShardReader(open(dst / "00001.tar", "rb"), "x")] == [f"k{i:03d}" for i in range(64)]
    rows = rows_by_key(dst)
    assert len(rows) == 2 + 1 + 64 and {r["status"] for r in rows.values()} == {"ok"}
    assert leftovers(dst) == []


# ------------------------------------------------------------------------------------------------ without Ray
class _Pipeline:
    """A worker as a shard's context sees it, whose pipeline hands every row back at once, counting those in
    flight (given to the pipeline, not yet taken back by the shard)."""

    def __init__(self, budget: int):
        self.spec = {"cfg": None, "ds": None, "src": None, "dst": None, "budget": budget}
        self.inflight = self.most = 0

    def push(self, st, rows):
        self.inflight += len(rows)
        self.most = max(self.most, self.inflight)
        for r in rows:
            st.results.put(r)

    def returned(self, st, key):
        self.inflight -= 1


def test_a_shard_has_at_most_its_budget_in_flight_and_says_when_it_is_read():
    pipeline, st = _Pipeline(budget=10), _Open(1)
    ctx = _WorkerContext(pipeline, st)
    read = []

    def reader():
        for i in range(95):
            read.append(i)
            yield {"key": str(i)}

    got = []
    for row in ctx.through(reader()):
        assert len(read) - len(got) <= 10  # the reader never runs ahead of the budget
        assert not st.read_all.is_set() or len(read) == 95  # said once the reader is done, not before
        got.append(row["key"])
    assert got == [str(i) for i in range(95)] and pipeline.most == 10 and st.read_all.is_set()


def test_a_stopped_shard_stops_waiting_for_its_results():
    class Stuck(_Pipeline):
        def push(self, st, rows):  # nothing ever comes back
            self.inflight += len(rows)

    st = _Open(1)
    rows = _WorkerContext(Stuck(budget=4), st).through({"key": str(i)} for i in range(9))
    threading.Timer(0.2, st.stop.set).start()
    with pytest.raises(_Stop):
        next(rows)
    with pytest.raises(_Stop), _WorkerContext(Stuck(budget=4), st).hold():
        pass  # what is held (a result taken, a shard published) ends whole, then the stop


def test_spilled_rows_come_back_in_pages():
    from jobs.dataset_shard import RowSpill

    spill = RowSpill()
    for i in range(5):
        spill.add(({"key": str(i), "data": io.BytesIO(b"x").getvalue()}, i % 2 == 0))
    pages = [spill.take(2), spill.take(2), spill.take(2), spill.take(2)]
    assert [[r["key"] for r, _ in p] for p in pages] == [["0", "1"], ["2", "3"], ["4"], []]
    spill.close()
    assert spill.take(2) == []
