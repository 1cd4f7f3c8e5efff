"""A bulk job that streams: the listing folder by folder, the manifest grown by parts (one dataset, every row once,
readable mid-job and after a stop), --resume from a manifest of parts, --limit, a streaming --dry-run, and
`pidray status`."""

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.manifest import MANIFEST_NAME, manifest_parts, manifest_row, read_manifest, read_previous
from jobs.manifest_writer import ManifestWriter
from jobs.pipeline import JobConfig, run_job
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.storage import Location


def _save(path, color=(200, 30, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")


def _job(src, dst, weights, **kw) -> JobConfig:
    return JobConfig(str(src), str(dst), ModelOptions(weights=weights), UpscaleOptions(), local=True, progress=False,
                     **kw)  # fmt: skip


def _row(key, status="ok", **kw):
    return manifest_row({"key": key, "status": status, "in_bytes": 3, "in_hw": [2, 2], "out_hw": [8, 8], **kw}, "small")


def test_the_listing_is_a_stream_of_folders_each_sorted(tmp_path):
    for key in ("b/2.png", "b/1.png", "a.png", "c/d/e.png", "c/z.png", ".hidden/x.png", "notes.txt"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"")
    folder, entries = next(Location(str(tmp_path)).folders())  # the first folder, before the others are listed
    assert folder == "" and [e.key for e in entries] == ["a.png"]
    got = [(folder, [e.key for e in entries]) for folder, entries in Location(str(tmp_path)).folders()]
    assert got == [("", ["a.png"]), (".hidden", [".hidden/x.png"]), ("b", ["b/1.png", "b/2.png"]),
                   ("c", ["c/z.png"]), ("c/d", ["c/d/e.png"])]  # fmt: skip
    hidden = dict(Location(str(tmp_path)).folders())[".hidden"][0]
    assert "hidden file" in hidden.skip
    assert [e.key for e in Location(str(tmp_path)).list()] == sorted(k for _, ks in got for k in ks)


def test_the_manifest_grows_by_parts_each_row_once(tmp_path):
    dst = Location(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_bytes(b"an earlier manifest")  # replaced at the first part
    w = ManifestWriter(dst, tag="t", every_s=0, fold_max=0)
    for i in range(3):
        w.add(_row(f"a{i}.png"))
    assert w.due()
    w.flush()
    mid = pads.dataset(str(tmp_path / MANIFEST_NAME)).to_table()  # readable while the job runs
    assert sorted(mid.column("key").to_pylist()) == ["a0.png", "a1.png", "a2.png"]
    w.add(_row("b.png", "failed", error="bad", error_kind="bad_input"))
    w.flush()
    assert w.flush() == 0.0  # nothing new: no part
    assert len(manifest_parts(dst)) == 2 and (tmp_path / MANIFEST_NAME).is_dir()
    w.add(_row("c.png", "interrupted"))
    where = w.close()  # fold_max 0: stays a folder
    assert where.endswith(MANIFEST_NAME)
    keys = pq.read_table(tmp_path / MANIFEST_NAME).column("key").to_pylist()
    assert sorted(keys) == ["a0.png", "a1.png", "a2.png", "b.png", "c.png"]
    assert {r["key"]: r["status"] for r in read_manifest(dst)}["c.png"] == "interrupted"
    assert not list(tmp_path.rglob(".pidray-*"))  # no temporary left


def test_a_small_jobs_parts_fold_into_one_file(tmp_path):
    dst = Location(str(tmp_path))
    w = ManifestWriter(dst, every_s=0)
    w.add(_row("a.png"))
    w.flush()
    w.add(_row("b.png"))
    w.close()
    assert (tmp_path / MANIFEST_NAME).is_file() and not (tmp_path / f"{MANIFEST_NAME}.compacting").exists()
    assert sorted(r["key"] for r in read_manifest(dst)) == ["a.png", "b.png"]


def test_a_damaged_part_is_set_aside_and_the_others_used(tmp_path):
    dst = Location(str(tmp_path))
    w = ManifestWriter(dst, every_s=0, fold_max=0)
    w.add(_row("a.png"))
    w.flush()
    w.add(_row("b.png"))
    w.close()
    (tmp_path / MANIFEST_NAME / "part-000009-x.parquet").write_bytes(b"PAR1 not really")
    prev = read_previous(dst)
    assert set(prev.rows) == {"a.png", "b.png"} and "cannot be read" in prev.problem
    assert prev.bad == [f"{MANIFEST_NAME}/part-000009-x.parquet"] and prev.set_aside == 0  # only its own rows lost


def test_resume_from_a_manifest_of_parts_redoes_nothing_done(bicubic_weights, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    for i, folder in enumerate(["", "sub/", "sub/deeper/"]):
        _save(src / f"{folder}a.png", color=(i * 50, 1, 1))
        _save(src / f"{folder}a.gif", color=(i * 50, 2, 2))  # a clash: named a.png.png / a.gif.png in each folder
    first = run_job(_job(src, dst, bicubic_weights, limit=4))
    assert first.ok == 4 and first.failed == 0
    rows = {r["key"]: r for r in read_manifest(Location(str(dst)))}
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    assert rows["a.gif"]["output_key"] == "a.gif.png" and rows["a.png"]["output_key"] == "a.png.png"
    rest = run_job(_job(src, dst, bicubic_weights, resume=True))
    assert (rest.ok, rest.skipped, rest.failed) == (2, 4, 0), rest.line()
    after = {r["key"]: r for r in read_manifest(Location(str(dst)))}
    assert sorted(after) == sorted(k.relative_to(src).as_posix() for k in src.rglob("a.*"))  # every input once
    assert all(after[k]["output_key"] == rows[k]["output_key"] for k in rows)  # named as the first run did
    assert after["sub/deeper/a.gif"]["output_key"] == "sub/deeper/a.gif.png"


def test_a_dry_run_streams_each_planned_row_and_limit_stops_it(bicubic_weights, tmp_path):
    src = tmp_path / "in"
    for i in range(5):
        _save(src / f"f{i}" / "x.png")
    (src / "f0" / "link.png").symlink_to(src / "f1" / "x.png")
    seen = []
    summary = run_job(_job(src, tmp_path / "out", bicubic_weights, dry_run=True, limit=3), on_row=seen.append)
    assert [r["status"] for r in seen] == ["skipped", "planned", "planned", "planned"]  # the link, then 3 of 5
    assert summary.planned == 3 and summary.skipped == 1 and not (tmp_path / "out").exists()
    assert seen[1]["output_key"] == "f0/x.*"


def test_folders_that_differ_only_in_case_get_outputs_that_do_too(bicubic_weights, tmp_path):
    src = tmp_path / "in"
    _save(src / "A" / "x.png")
    _save(src / "a" / "x.png")
    seen = []
    run_job(_job(src, tmp_path / "out", bicubic_weights, dry_run=True), on_row=seen.append)
    outs = [r["output_key"].casefold() for r in seen]
    assert len(outs) == 2 and len(set(outs)) == 2, outs


def test_status_reads_a_running_or_finished_jobs_manifest(tmp_path, capsys):
    from pidray.cli import main

    dst = Location(str(tmp_path))
    w = ManifestWriter(dst, every_s=0, fold_max=0)
    for i in range(4):
        w.add(_row(f"ok{i}.png", timings={"diffuse": 0.5, "decode": 0.01}))
    w.flush()
    w.add(_row("bad.png", "failed", error="not an image", error_kind="bad_input"))
    w.add(_row("big.png", "failed", error="too big", error_kind="too_large"))
    w.flush()  # as a running job leaves it: parts, no final fold
    assert main(["status", str(tmp_path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["status"] == {"ok": 4, "failed": 2} and st["error_kinds"] == {"bad_input": 1, "too_large": 1}
    assert st["slowest_stage"] == "diffuse" and st["parts"] == 2 and st["rows"] == 6
    assert [f["key"] for f in st["first_failures"]] == ["bad.png", "big.png"]
    assert main(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "4 ok, 2 failed" in text and "failed  bad.png: [bad_input] not an image" in text
    assert main(["status", str(tmp_path / "nothing")]) == 2  # no manifest: one line, exit 2
    assert "no pidray manifest" in capsys.readouterr().err


def test_status_of_a_foreign_table_says_so(tmp_path, capsys):
    from pidray.cli import main

    pq.write_table(pa.table({"name": ["a"]}), tmp_path / MANIFEST_NAME)
    assert main(["status", str(tmp_path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rows"] == 0 and "lacks the column" in st["problem"]


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1e400"])
def test_limit_takes_a_positive_whole_number(bad, capsys):
    from pidray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["upscale", "a", "b", "--limit", bad])
    assert e.value.code == 2 and "--limit" in capsys.readouterr().err


@pytest.mark.slow
def test_a_ray_job_through_the_feed_does_every_input_once(bicubic_weights, tmp_path, monkeypatch):
    """Rows past SMALL_JOB_ROWS enter Ray Data through the feed actor as they are planned, with the in-flight bound
    far below the job's size: every input comes back once (ok), the manifest has each key once, and a --resume
    plans none of them again."""
    import jobs.pipeline as jp
    import jobs.raydata as rd

    monkeypatch.setattr(rd, "SMALL_JOB_ROWS", 3)  # the feed, not from_items
    # the planner waits for results (backpressure), with room for the stages' batches (8 + 16 rows) to fill
    monkeypatch.setattr(jp, "MAX_IN_FLIGHT", 32)
    src, dst = tmp_path / "in", tmp_path / "out"
    for i in range(40):
        _save(src / f"f{i % 3}/img{i:02d}.png", color=(i * 15, 40, 90), size=(8, 8))
    cfg = JobConfig(str(src), str(dst), ModelOptions(weights=bicubic_weights), UpscaleOptions(), local=False,
                    progress=False)  # fmt: skip
    import ray

    try:
        summary = run_job(cfg)  # starts Ray in-process
    finally:
        ray.shutdown()
    assert (summary.ok, summary.failed, summary.runner) == (40, 0, "Ray Data"), summary.line()
    rows = read_manifest(Location(str(dst)))
    assert sorted(r["key"] for r in rows) == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    assert all(r["status"] == "ok" for r in rows)
    assert len(list(dst.rglob("img*.png"))) == 40
    again = run_job(_job(src, dst, bicubic_weights, resume=True, dry_run=True))
    assert (again.planned, again.skipped) == (0, 40)


def test_ray_data_thread_errors_after_a_stop_go_to_the_log(tmp_path, monkeypatch):
    """After Ctrl-C stopped Ray, Ray Data's executor thread may fail on its way out: its trace goes to the Ray log, not
    the terminal; any other thread's error still reaches the usual hook."""
    import threading

    from jobs import terminal

    monkeypatch.setattr(terminal._RayQuiet, "LOG", str(tmp_path / "ray.log"))
    shown = []
    monkeypatch.setattr(threading, "excepthook", lambda args: shown.append(args.thread.name))  # the usual hook

    def boom():
        raise RuntimeError("Ray is not initialized")

    terminal.quiet_ray_data_threads()
    for name in ("StreamingExecutor-dataset_1", "mine"):
        t = threading.Thread(target=boom, name=name)
        t.start()
        t.join()
    assert shown == ["mine"]
    assert "Ray is not initialized" in (tmp_path / "ray.log").read_text()


def test_the_feed_actor_keeps_only_what_is_in_flight():
    """The feed actor (a plain class here) hands chunks by (task, number), gives a task that asks again the same
    chunk, drops a chunk once all its rows came back (an empty chunk if asked again), and holds nothing for done
    chunks however long the job."""
    from jobs.feed import Feed

    f = Feed()
    for c in range(3):
        f.put(c, [f"row{c}"])
    assert f.take(0, 0) == (0, ["row0"]) and f.take(1, 0) == (1, ["row1"])
    assert f.take(0, 0) == (0, ["row0"])  # Ray ran the task again: the same rows
    f.forget([0])
    assert f.take(0, 0) == (-1, [])  # every row of it came back: nothing to redo
    assert f.take(0, 1) == (2, ["row2"]) and f.take(0, 2) == "wait"
    f.forget([1, 2])
    assert f.given == {} and f.where == {}
    f.close()
    assert f.take(0, 2) is None


def test_a_feed_task_waits_in_the_feed_actor_instead_of_polling():
    """An idle feed task's take waits in the actor (one call per wait, not a stream of polls): it returns as soon as a
    chunk is put or the feed is closed, and "wait" only once its time is up."""
    import threading
    import time

    from jobs.feed import Feed

    f = Feed()
    t0 = time.monotonic()
    assert f.take(0, 0, wait_s=0.3) == "wait" and time.monotonic() - t0 >= 0.29
    threading.Timer(0.1, f.put, args=(7, ["row"])).start()
    t0 = time.monotonic()
    assert f.take(0, 0, wait_s=30) == (7, ["row"]) and time.monotonic() - t0 < 10
    threading.Timer(0.1, f.close).start()
    t0 = time.monotonic()
    assert f.take(0, 1, wait_s=30) is None and time.monotonic() - t0 < 10


def test_a_feed_that_stops_taking_rows_releases_the_planner():
    """When the driver's end of the feed fails (the actor or Ray gone), the planner thread feeding it does not block
    forever on a full queue: it stops drawing rows and ends."""
    import threading
    import time

    from jobs.feed import RayFeed

    drawn = []

    def rows():
        for i in range(10_000):
            drawn.append(i)
            yield {"key": f"k{i}"}

    feed = object.__new__(RayFeed)
    feed.rows, feed.error, feed.lock, feed.halt = rows(), None, threading.Lock(), threading.Event()
    feed.chunk_of, feed.left = {}, {}
    feed.ray = type("NoRay", (), {"is_initialized": staticmethod(lambda: False)})

    def broken_put(chunk_id, chunk):
        raise RuntimeError("the feed actor died")

    feed._put = broken_put
    feed._run()
    assert isinstance(feed.error, RuntimeError)
    deadline = time.time() + 10
    while any(t.name == "pidray-plan" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(t.name == "pidray-plan" for t in threading.enumerate())
    assert len(drawn) < 100  # it stopped drawing: the rest of the listing is never read


def test_a_stopped_feed_never_calls_ray():
    """After the driver stops the feed (Ctrl-C, before Ray shuts down), putting a chunk makes no Ray call: one made
    after the shutdown would start a new local Ray from the feed's thread, left running after the job."""
    import threading

    from jobs.feed import RayFeed, _Halted

    class Ray:
        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def get(ref):
            raise AssertionError("a Ray call after stop")

    feed = object.__new__(RayFeed)
    feed.ray, feed.halt, feed.lock, feed.chunk_of, feed.left = Ray, threading.Event(), threading.Lock(), {}, {}
    feed.thread = threading.Thread(target=lambda: None)
    feed.stop()
    with pytest.raises(_Halted):
        feed._put(0, [{"key": "a"}])
    assert feed.chunk_of == {}
