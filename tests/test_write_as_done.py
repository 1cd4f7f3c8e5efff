"""Each image's output is written as soon as that image is done, while the other images of its batch keep going;
Ctrl-C keeps every finished output with its `ok` row.

Through the real CLI (`python -m pidray.cli upscale`), on the `small` preset at its bicubic initialisation. The six
inputs differ in size, so each is diffused in a group of its own (one tile shape each), one group after another.
They have transparency and are written as JPEG, so the job says a note for each row as it hears that the row is done:
that line tells, from outside, the order in which the rows finished and when.
"""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.manifest import MANIFEST_NAME, read_manifest
from pipeline.storage import Location

from conftest import ROOT

# listing order is not size order: heights in latent pixels below the small preset's tile (32), so every image has
# a tile shape of its own; 190 wide: eight tiles each
SIZES = {"a.png": (190, 26), "b.png": (190, 10), "c.png": (190, 18), "d.png": (190, 6), "e.png": (190, 22),
         "f.png": (190, 14)}  # fmt: skip
NOTE = "note    "


def _inputs(src: Path, sizes: dict) -> None:
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        rgba = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
        rgba[..., 3] = 128  # transparency: dropped in a JPEG, and said per row
        Image.fromarray(rgba, "RGBA").save(src / name)


def _outputs(dst: Path) -> dict[str, int]:
    """The outputs in DST (no manifest, no temporaries), by name, with their mtime (ns)."""
    out = {}
    for p in dst.glob("*.jpg") if dst.is_dir() else ():
        try:
            out[p.name] = p.stat().st_mtime_ns
        except FileNotFoundError:
            pass
    return out


class _Job:
    """The CLI in a subprocess; its stderr read as it comes: each row's note with the outputs present right then."""

    def __init__(self, tmp_path: Path, weights: str, *extra: str, sizes: dict = SIZES):
        self.src, self.dst = tmp_path / "in", tmp_path / "out"
        _inputs(self.src, sizes)
        cmd = [sys.executable, "-m", "pidray.cli", "upscale", str(self.src), str(self.dst), "--weights", weights,
               "-f", "jpg", "--no-progress", *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.notes: list[tuple[str, set[str]]] = []  # (key, outputs present when the job said the row was done)
        self.stderr: list[str] = []
        self.stdout = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            present = set(_outputs(self.dst))
            self.stderr.append(line)
            if line.startswith(NOTE) and "transparency dropped" in line:
                self.notes.append((line[len(NOTE) :].partition(":")[0], present))

    def wait_for(self, what, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None and not what():
            time.sleep(0.02)
        assert what(), f"not seen before the deadline (exit {self.proc.poll()}):\n{''.join(self.stderr)[-3000:]}"

    def finish(self, timeout: float = 300) -> int:
        self.stdout = self.proc.stdout.read()
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return rc

    def rows(self) -> dict[str, dict]:
        return {r["key"]: r for r in read_manifest(Location(str(self.dst)))}


def test_the_loop_hands_each_group_on_as_it_is_diffused_with_the_same_outputs(bicubic_weights):
    """In process: a row comes out of `run_local` after its own group's diffusion, before the next group's starts,
    in the order the rows finish (a row that failed earlier comes out with the row before it), and every output is
    bit for bit the one the chunk gives when each stage takes the whole chunk at once."""
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions
    from pipeline.stages import run_stage

    from conftest import png_bytes

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (h, 40, 3), dtype=np.uint8) for h in (9, 13, 9, 17)]
    rows = [{"key": f"{i}", "bytes": png_bytes(Image.fromarray(a))} for i, a in enumerate(images)]
    rows.insert(2, {"key": "broken", "bytes": b"not an image"})
    graph = StageGraph(ModelOptions("small", bicubic_weights))
    stages = graph.build_all()
    diffuse = stages[graph.names().index("diffuse")]
    calls = []
    real = diffuse.process_batch
    diffuse.process_batch = lambda batch: calls.append([r["key"] for r in batch]) or real(batch)
    seen = []
    for r in graph.run_local(rows, stages):
        seen.append((r["key"], list(calls)))
    assert [k for k, _ in seen] == ["0", "2", "1", "broken", "3"]  # as they finish; "broken" after the row before it
    # heights 9, 13, 9, 17: three groups, the two 9-high images together, each handed on before the next diffuses
    assert dict(seen)["0"] == [["0", "2"]] and dict(seen)["2"] == [["0", "2"]]
    assert dict(seen)["1"] == [["0", "2"], ["1"]] and dict(seen)["3"] == [["0", "2"], ["1"], ["3"]]
    chunk = [graph.workflow.enter(r) for r in rows]
    for spec, stage in zip(graph.stages, stages):
        chunk = run_stage(stage, spec.name, chunk)
    got = {r["key"]: r for r in graph.run_local(rows, stages)}
    assert got["broken"]["status"] == "failed" and chunk[2]["status"] == "failed"
    for want in chunk:
        if want["key"] != "broken":
            assert got[want["key"]]["output"] == want["output"], want["key"]


def _interrupted_after_first_output(tmp_path, weights, *extra, timeout):
    job = _Job(tmp_path, weights, *extra)
    try:
        # the first output is there and the job has said that its row is done: Ctrl-C now
        job.wait_for(lambda: job.notes and _outputs(job.dst), timeout)
        first = job.notes[0][0]
        job.proc.send_signal(signal.SIGINT)
        rc = job.finish()
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    err = "".join(job.stderr)
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err and "--resume" in err, err[-3000:]
    rows = job.rows()
    assert set(rows) == set(SIZES), "one manifest row per input"
    assert rows[first]["status"] == "ok" and rows[first]["output_key"] == first.replace(".png", ".jpg")
    assert (job.dst / rows[first]["output_key"]).is_file()
    assert {r["status"] for r in rows.values()} <= {"ok", "interrupted"}
    assert any(r["status"] == "interrupted" for r in rows.values()), "the job was stopped before every image was done"
    assert not list(job.dst.rglob(".pidray-*"))
    return job, rows


def test_ctrl_c_keeps_each_finished_output_with_its_ok_row(bicubic_weights, tmp_path):
    job, rows = _interrupted_after_first_output(tmp_path, bicubic_weights, "--local", timeout=300)
    ok = {r["output_key"] for r in rows.values() if r["status"] == "ok"}
    assert ok == set(_outputs(job.dst)), "every output there has its ok row, and every ok row its output"
    assert all(r["output_key"] == "" for r in rows.values() if r["status"] == "interrupted")


def test_outputs_land_one_by_one_in_the_order_images_finish(bicubic_weights, tmp_path):
    job = _Job(tmp_path, bicubic_weights, "--local")
    try:
        rc = job.finish()
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    assert rc == 0, "".join(job.stderr)[-3000:]
    finished = [key.replace(".png", ".jpg") for key, _ in job.notes]
    assert sorted(finished) == sorted(n.replace(".png", ".jpg") for n in SIZES), job.notes
    outputs = _outputs(job.dst)
    assert sorted(outputs, key=outputs.get) == finished, "outputs were written in the order the images finished"
    for key, present in job.notes:
        assert key.replace(".png", ".jpg") in present, f"{key} was reported done before its output was there"
    # the first image's output was there, and its row reported, while the last image was still being worked on
    assert finished[-1] not in job.notes[0][1], job.notes
    rows = job.rows()
    assert all(r["status"] == "ok" for r in rows.values()) and (job.dst / MANIFEST_NAME).is_file()


@pytest.mark.slow
def test_ctrl_c_keeps_each_finished_output_on_ray_data(bicubic_weights, tmp_path):
    """The same on Ray Data: the diffuse actor hands each finished group on while the next one runs, so the first
    output lands (and is reported) before the batch of six is done. An output a worker wrote that the driver had not
    heard of yet when Ctrl-C came is recorded as written (`interrupted`, its output named, --resume keeps it)."""
    job, rows = _interrupted_after_first_output(tmp_path, bicubic_weights, "--ray", timeout=420)
    outputs = set(_outputs(job.dst))
    ok = {r["output_key"] for r in rows.values() if r["status"] == "ok"}
    landed = {r["output_key"] for r in rows.values() if r["status"] == "interrupted" and r["output_key"]}
    assert ok | landed == outputs and not ok & landed, (ok, landed, outputs)
    assert len(outputs) < len(SIZES), "outputs land while the other images of the batch are still diffusing"


@pytest.mark.slow
def test_outputs_land_one_by_one_on_ray_data(bicubic_weights, tmp_path):
    """Ray Data takes the images into the diffuse actor as one batch; the last one (z, 49 tiles) takes longer than
    the others. Each output lands as its image is done: the first one long before z's, by about z's own diffusion
    time (as z's row records it), not all of them together once the whole batch is done."""
    sizes = {**SIZES, "z.png": (160, 160)}
    job = _Job(tmp_path, bicubic_weights, "--ray", sizes=sizes)
    try:
        rc = job.finish(timeout=600)
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    assert rc == 0, "".join(job.stderr)[-3000:]
    rows = job.rows()
    assert {r["status"] for r in rows.values()} == {"ok"} and len(rows) == len(sizes)
    outputs = _outputs(job.dst)
    assert len(outputs) == len(sizes)
    finished = [key.replace(".png", ".jpg") for key, _ in job.notes]
    assert sorted(outputs, key=outputs.get) == finished, "outputs were written in the order the images finished"
    for key, present in job.notes:
        assert key.replace(".png", ".jpg") in present, f"{key} was reported done before its output was there"
    first = min(outputs.values())
    assert outputs["z.jpg"] == max(outputs.values()), outputs
    gap_s = (outputs["z.jpg"] - first) / 1e9
    assert gap_s >= 0.5 * rows["z.png"]["t_diffuse"], (gap_s, rows["z.png"]["t_diffuse"])
