"""The ETA holds steady on a steady job, a job off a terminal says how far it is at least every interval, and Ctrl-C
answers at once and stops within seconds.

The ETA test replays progress reports on a clock of its own. The other two run the real CLI (`python -m pidray`, the
bundled `small` model on the CPU) with stderr piped: a 256² image at -t 1024 is one 1024² tile, whose network calls
take tens of seconds on a CPU, each made of single operations of several seconds during which Python runs nothing
else.
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.lease import LEASE_NAME
from jobs.manifest import read_manifest
from jobs.progress import JobProgress
from pipeline.storage import Location

from conftest import ROOT

# ------------------------------------------------------------------------------------------------ the ETA, replayed
TILES, CALLS, CALL_S, GAP_S = 4, 9, 1.0, 2.0  # per image: 9 network calls over 4 tiles, then decode/encode/write


class _Quiet:
    def isatty(self):
        return False

    def write(self, text):
        pass

    def flush(self):
        pass


def _replay(seed: int, images: int = 120, change_at: int | None = None, factor: float = 1.0):
    """A job's reports with ±30% jitter on every call and every gap between images; from image `change_at` on, each
    takes `factor` times as long. -> [(image index, time, ETA shown, work left)] at each report."""
    rng, now = random.Random(seed), [0.0]
    work = {f"{i:03d}.png": TILES * CALLS for i in range(images)}
    bar = JobProgress(work, _Quiet(), enabled=False, clock=lambda: now[0])
    out = []
    for i, key in enumerate(work):
        f = factor if change_at is not None and i >= change_at else 1.0
        for _ in range(CALLS):
            now[0] += f * CALL_S * rng.uniform(0.7, 1.3)
            bar.on_forwards(key, TILES)
            out.append((i, now[0], bar.eta(), bar.total - bar.done))
        now[0] += f * GAP_S * rng.uniform(0.7, 1.3)
        bar.row_done({"key": key, "status": "ok"})
    return out


def test_eta_moves_less_than_a_quarter_per_update_on_a_steady_job_and_follows_a_real_change():
    total = 120 * TILES * CALLS
    for seed in range(5):
        updates = _replay(seed)
        steady = [(a[2], b[2]) for a, b in zip(updates, updates[1:]) if a[0] >= 1 and b[3] > 0.1 * total]
        assert len(steady) > 900
        worst = max(abs(b / a - 1) for a, b in steady)
        assert worst < 0.25, (seed, worst)
    # the machine gets twice as slow (or twice as fast) from image 40 on: within 150 s (2.5 windows of the
    # throughput's average) the ETA is within 15% of the work left at the new rate, and stays there, moving steadily
    # meanwhile
    for factor in (2.0, 0.5):
        new_rate = TILES * CALLS / (factor * (CALLS * CALL_S + GAP_S))
        for seed in range(5):
            updates = _replay(seed, change_at=40, factor=factor)
            after = [(t, eta, left) for i, t, eta, left in updates if i >= 40 and left]
            off = [t - after[0][0] for t, eta, left in after if abs(eta / (left / new_rate) - 1) > 0.15]
            assert off and off[-1] < 150, (factor, seed, off[-1:])
            moves = [abs(b[1] / a[1] - 1) for a, b in zip(after, after[1:]) if b[2] > 0.05 * total]
            assert max(moves) < 0.25, (factor, seed, max(moves))


def test_reports_of_one_call_over_several_images_count_as_one():
    """A call over a group of images reports each image's tiles at once: the first image's report alone must not
    read as a slow call (nor the others as an instant burst of work)."""
    now = [0.0]
    work = {f"{i}.png": 36 for i in range(64)}
    bar = JobProgress(work, _Quiet(), enabled=False, clock=lambda: now[0])
    etas = []
    for group in range(8):
        keys = list(work)[group * 8 : group * 8 + 8]
        for _ in range(9):
            now[0] += 4.0
            for key in keys:
                bar.on_forwards(key, 4)
                now[0] += 1e-5
            etas.append((now[0], bar.eta()))
        now[0] += 3.0
        for key in keys:
            bar.row_done({"key": key, "status": "ok"})
    end = now[0]
    for at, eta in etas[9:]:  # from the second group on
        if end - at > 20:
            assert abs(eta - (end - at)) / (end - at) < 0.15, (at, eta, end - at)


# ------------------------------------------------------------------------------------------------ the real CLI
PROGRESS = re.compile(r"^upscale: (\d+)/(\d+) images \(\d+% of the work\), ETA \S+")


class _Job:
    """The CLI in a subprocess, stderr piped (no terminal), each stderr line kept with the time it was read."""

    def __init__(self, tmp_path: Path, sizes: dict[str, int], every: float):
        src = tmp_path / "in"
        src.mkdir()
        rng = np.random.default_rng(0)
        for name, side in sizes.items():
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(src / name)
        self.dst = tmp_path / "out"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDRAY_LOG_EVERY_S": str(every)}
        cmd = [sys.executable, "-m", "pidray", "upscale", str(src), str(self.dst), "-t", "1024", "--device", "cpu",
               "--local"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, what, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None and not what():
            time.sleep(0.05)
        assert what(), f"not seen in time (exit {self.proc.poll()}):\n{self.text()[-3000:]}"

    def progress(self) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if PROGRESS.match(line)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_a_progress_line_at_least_every_interval_while_one_image_takes_minutes(tmp_path):
    """Off a terminal the job says how far it is every PIDRAY_LOG_EVERY_S (2 s here; 30 s by default) even while no
    image finishes and a network call lasts tens of seconds, with the tile-steps done so far."""
    job = _Job(tmp_path, {"big.png": 256}, every=2)
    try:
        job.wait_for(lambda: len(job.progress()) >= 7, timeout=60)
        lines = job.progress()
    finally:
        job.stop()
    times = [t for t, _ in lines]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 4.0, (gaps, job.text())  # every 2 s (checked twice a second), with room for a busy machine
    for _, line in lines:
        assert PROGRESS.match(line).groups() == ("0", "1"), line  # no image finished meanwhile
        assert "tile-step" in line, line  # the tile-steps done so far, or none yet


def test_ctrl_c_answers_at_once_and_stops_within_seconds_keeping_what_finished(tmp_path):
    """SIGINT while a large image is being diffused (inside network operations that take seconds each): the job says
    at once that it stops and how many inputs it records as interrupted, and exits 130 within seconds; the image that
    had finished keeps its output and its `ok` row."""
    job = _Job(tmp_path, {"a_small.png": 24, "b_big.png": 256}, every=1)
    try:
        job.wait_for(lambda: any(PROGRESS.match(line).group(1) == "1" for _, line in job.progress()), timeout=60)
        time.sleep(4)  # well inside the large image's first network call
        assert job.proc.poll() is None
        sent = time.monotonic()
        job.proc.send_signal(signal.SIGINT)
        job.wait_for(lambda: any(line.startswith("stopping:") for t, line in job.lines if t >= sent), timeout=20)
        said = next(t for t, line in job.lines if t >= sent and line.startswith("stopping:"))
        rc = job.proc.wait(timeout=30)
        ended = time.monotonic()
        job.reader.join(timeout=10)
    finally:
        job.stop()
    text = job.text()
    # within 2 s on an idle machine; the bounds leave room for a machine busy with other tests
    assert said - sent < 5, (said - sent, text[-2000:])
    assert ended - sent < 20, (ended - sent, text[-2000:])
    assert rc == 130, (rc, text[-3000:])
    assert "stopping: finishing nothing, recording 1 interrupted" in text, text[-3000:]
    assert text.index("stopping:") < text.index("--resume"), text[-3000:]
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]
    listed = list(read_manifest(Location(str(job.dst))))
    rows = {r["key"]: r for r in listed}
    assert len(listed) == len(rows) == 2, listed  # one row per input, none twice
    assert rows["a_small.png"]["status"] == "ok" and (job.dst / rows["a_small.png"]["output_key"]).is_file()
    assert rows["b_big.png"]["status"] == "interrupted" and rows["b_big.png"]["output_key"] == ""
    assert sorted(p.name for p in job.dst.iterdir() if not p.name.startswith((".", "_"))) == ["a_small.png"]
    assert not (job.dst / LEASE_NAME).exists(), "the lease is released"
    assert not list(job.dst.glob(".pidray-*.part")), "no temporary left"
