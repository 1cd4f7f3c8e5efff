"""Benchmark: datasets as the dataset job reads them (one run each; figures from this machine, printed, not asserted).

    python tests/bench_datasets.py speed    # the same 2,000 16x16 PNGs as files, as 20 WebDataset shards and as one
                                            # Parquet table, each through `pidray upscale --ray`: images/s and ratios
    python tests/bench_datasets.py memory   # 1,000 shards of 1,000 8x8 PNGs: --dry-run, and --limit 2 --ray; then 20
                                            # shards of 100 (--limit 20 --ray, the same 2,000 samples): the peak RSS
                                            # of the driver and of each kind of Ray worker, to compare

Files go under --work (default /tmp/pidray-bench-datasets) and are deleted afterwards. The model is the bundled
small preset at its initialisation (nothing downloads).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def png(i: int, side: int) -> bytes:
    """A small deterministic image, different for each i."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, (1, 1, 3))
    ramp = np.linspace(0, 60, side)[None, :, None] + np.linspace(0, 40, side)[:, None, None]
    a = np.clip(base + ramp + rng.normal(0, 8, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, images: list[bytes], first: int) -> None:
    with tarfile.open(path, "w") as tar:
        for j, data in enumerate(images):
            info = tarfile.TarInfo(f"s{first + j:08d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class Watched:
    """A pidray command and every process under it (Ray's workers too): the peak RSS (VmHWM) of each, polled."""

    def __init__(self, args: list[str]):
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "pidray.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.peak: dict[str, int] = {}  # kind of process -> its largest VmHWM in kB

    def _children(self) -> dict[int, int]:
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                    parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        return parent

    def poll(self) -> None:
        parent = self._children()
        tree, grew = {self.proc.pid}, True
        while grew:
            more = {p for p, pp in parent.items() if pp in tree} - tree
            tree |= more
            grew = bool(more)
        for pid in tree:
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kind = "driver" if pid == self.proc.pid else name.split(" ")[0][:40] or "?"
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak[kind] = max(self.peak.get(kind, 0), int(line.split()[1]))

    def wait(self) -> tuple[int, float, str]:
        out = []
        import threading

        t = threading.Thread(target=lambda: out.extend(self.proc.stdout))
        t.start()
        while self.proc.poll() is None:
            self.poll()
            time.sleep(0.3)
        t.join()
        return self.proc.returncode, time.time() - self.t0, "".join(out)


def run(args: list[str]) -> dict:
    w = Watched(args)
    rc, seconds, out = w.wait()
    done = [line for line in out.splitlines() if line.startswith("done:")]
    peaks = {k: round(v / 1024) for k, v in sorted(w.peak.items(), key=lambda kv: -kv[1])}
    return {"rc": rc, "s": round(seconds, 1), "done": done[-1] if done else out[-300:], "peak_mb": peaks}


def speed(work: Path, weights: str, n: int = 2000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [png(i, 16) for i in range(n)]
    (work / "files").mkdir(parents=True)
    for i, data in enumerate(images):
        (work / "files" / f"s{i:08d}.png").write_bytes(data)
    (work / "shards").mkdir()
    for k in range(20):
        per = n // 20
        write_shard(work / "shards" / f"{k:05d}.tar", images[k * per : (k + 1) * per], k * per)
    (work / "table").mkdir()
    table = pa.table({"key": [f"s{i:08d}" for i in range(n)], "image": pa.array(images, pa.binary())})
    pq.write_table(table, work / "table" / "train.parquet", row_group_size=100)
    common = ["--ray", "--weights", weights, "--no-progress", "-f", "png"]
    got = {}
    for what in ("files", "shards", "table"):
        r = run(["upscale", str(work / what), str(work / f"out-{what}"), *common])
        got[what] = r
        print(f"{what:7s}: {n / r['s']:.1f} images/s over the whole command ({r['s']} s, rc {r['rc']}); {r['done']}")
    for what in ("shards", "table"):
        print(f"{what} / files: {got['files']['s'] / got[what]['s']:.2f}x")


def memory(work: Path, weights: str) -> None:
    img = png(0, 8)
    big = work / "big"
    big.mkdir(parents=True)
    t0 = time.time()
    for k in range(1000):
        write_shard(big / f"{k:05d}.tar", [img] * 1000, k * 1000)
    print(f"made 1,000 shards of 1,000 8x8 PNGs in {time.time() - t0:.0f} s")
    small = work / "small"
    small.mkdir()
    for k in range(20):
        write_shard(small / f"{k:05d}.tar", [img] * 100, k * 100)
    common = ["--weights", weights, "--no-progress", "-f", "png"]
    for label, args in [
        ("--dry-run, 1,000 shards of 1,000", ["upscale", str(big), str(work / "o1"), "--dry-run", *common]),
        ("--limit 2 --ray, shards of 1,000", ["upscale", str(big), str(work / "o2"), "--limit", "2", "--ray", *common]),
        ("--limit 20 --ray, shards of 100", ["upscale", str(small), str(work / "o3"), "--limit", "20", "--ray",
                                             *common]),
    ]:  # fmt: skip
        r = run(args)
        print(f"{label}: {r['s']} s, rc {r['rc']}; peak RSS MB {r['peak_mb']}; {r['done'][:160]}")


def main() -> int:
    from bench_stream import weights

    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["speed", "memory"])
    p.add_argument("--work", default="/tmp/pidray-bench-datasets")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        w = weights(work)
        speed(work, w) if a.what == "speed" else memory(work, w)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
