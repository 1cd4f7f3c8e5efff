"""Benchmark: a bulk job whose driver streams (one run each; figures from this machine, printed, not asserted).

    python tests/bench_stream.py dry-run      # --dry-run over 100,000 and 1,000,000 empty files: max RSS, first line
    python tests/bench_stream.py ray          # --ray over 300,000 8x8 PNGs, SIGINT after ~200 outputs, then --resume
    python tests/bench_stream.py s3           # the same over the moto S3 server, 20,000 objects
    python tests/bench_stream.py flush        # a manifest flush with 100,000 and 1,000,000 rows already written

Files go under --work (default /tmp/pidray-bench) in folders of 1,000 and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def weights(work: Path) -> str:
    """The small preset at its initialisation (returns bicubic): nothing downloads."""
    path = work / "small_init.safetensors"
    if not path.exists():
        import torch

        from jobs.train_small import init_weights
        from pipeline.model.loading import save_safetensors
        from pipeline.model.network import PidNet
        from pipeline.model.presets import get_preset

        cfg = get_preset("small").config
        torch.manual_seed(0)
        net = PidNet(cfg)
        init_weights(net)
        save_safetensors(net, path, cfg)
    return str(path)


def make_files(folder: Path, n: int, data: bytes = b"", per: int = 1000) -> None:
    for i in range(n):
        sub = folder / f"{i // per:05d}"
        if i % per == 0:
            sub.mkdir(parents=True, exist_ok=True)
        with open(sub / f"img{i:07d}.png", "wb") as f:
            f.write(data)


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


class Watched:
    """A pidray command: its first stdout line's time, its max RSS (VmHWM, polled), SIGINT after a condition."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "pidray.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})})  # fmt: skip
        self.hwm_kb = 0

    def poll_rss(self) -> None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
        except OSError:
            pass


def dry_run(work: Path, n: int, w: str) -> dict:
    src = work / f"empty{n}"
    make_files(src, n)
    cmd = Watched(["upscale", str(src), str(work / f"out{n}"), "--dry-run", "--weights", w, "--no-progress"])
    import threading

    first, lines = [None], [0]

    def read():
        for _ in cmd.proc.stdout:
            if first[0] is None:
                first[0] = time.time() - cmd.t0
            lines[0] += 1

    t = threading.Thread(target=read)
    t.start()
    while cmd.proc.poll() is None:
        cmd.poll_rss()
        time.sleep(0.2)
    t.join()
    total = time.time() - cmd.t0
    shutil.rmtree(src)
    return {"inputs": n, "first_line_s": round(first[0] or -1, 2), "total_s": round(total, 1), "lines": lines[0],
            "max_rss_mb": round(cmd.hwm_kb / 1024), "rc": cmd.proc.returncode}  # fmt: skip


def interrupted_job(src: str, dst: Path, w: str, planned_total: int, env: dict | None = None, extra=()) -> dict:
    """A --ray job stopped with SIGINT after ~200 outputs; the manifest checked; --resume --dry-run then plans
    none of the done ones."""
    import pyarrow.dataset as pads

    cmd = Watched(["upscale", src, str(dst), "--ray", "--weights", w, "--no-progress", *extra], env)
    first = None
    while cmd.proc.poll() is None:
        cmd.poll_rss()
        n = sum(1 for _ in dst.rglob("img*.png")) if dst.exists() else 0
        if n and first is None:
            first = time.time() - cmd.t0
        if n >= 200:
            cmd.proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    out, err = cmd.proc.communicate(timeout=600)
    cmd.poll_rss()
    table = pads.dataset(str(dst / "_pidray_manifest.parquet")).to_table(columns=["key", "status"])
    status = table.column("status").to_pylist()
    keys = table.column("key").to_pylist()
    outputs = sum(1 for _ in dst.rglob("img*.png"))
    resume = subprocess.run([sys.executable, "-m", "pidray.cli", "upscale", src, str(dst), "--resume", "--dry-run",
                             "--weights", w, "--no-progress", "--limit", "1000", *extra], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, **(env or {})})  # fmt: skip
    redo = [ln.split()[1] for ln in resume.stdout.splitlines() if ln.startswith("planned")]
    done = {k for k, s in zip(keys, status) if s == "ok"}
    return {
        "first_output_s": round(first or -1, 1), "driver_max_rss_mb": round(cmd.hwm_kb / 1024),
        "rc": cmd.proc.returncode, "manifest_rows": len(keys), "unique_keys": len(set(keys)),
        "ok": status.count("ok"), "interrupted": status.count("interrupted"), "other": len(keys) - status.count("ok")
        - status.count("interrupted"), "outputs_in_dst": outputs, "inputs": planned_total,
        "resume_plans_a_done_one": any(k in done for k in redo), "resume_planned_first_1000": len(redo),
        "stderr_tail": err.decode()[-300:],
    }  # fmt: skip


def ray_bench(work: Path, w: str) -> dict:
    src, dst = work / "tiny", work / "tiny-out"
    make_files(src, 300_000, tiny_png())
    try:
        return interrupted_job(str(src), dst, w, 300_000)
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


def s3_bench(work: Path, w: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_CREDS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=45713, verbose=False)
    server.start()
    url = "http://127.0.0.1:45713"
    try:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        data = tiny_png()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket="bench", Key=f"in/{i // 1000:05d}/img{i:07d}.png", Body=data),
                          range(20_000)))  # fmt: skip
        return interrupted_job("s3://bench/in", work / "s3-out", w, 20_000, S3_CREDS, ("--s3-endpoint", url))
    finally:
        server.stop()
        shutil.rmtree(work / "s3-out", ignore_errors=True)


def flush_bench(work: Path) -> dict:
    from jobs.manifest import manifest_row
    from jobs.manifest_writer import ManifestWriter
    from pipeline.storage import Location

    def rows(start: int, n: int):
        return [manifest_row({"key": f"{i // 1000:05d}/img{i:07d}.png", "status": "ok", "in_bytes": 70,
                              "in_hw": [8, 8], "out_hw": [32, 32], "timings": {"diffuse": 0.1}}, "small")
                for i in range(start, start + n)]  # fmt: skip

    out = {}
    dst = work / "flush"
    writer = ManifestWriter(Location(str(dst)), tag="bench")
    done = 0
    for target in (100_000, 1_000_000):
        while done < target:
            for r in rows(done, 10_000):
                writer.add(r)
            writer.flush()
            done += 10_000
        times = []
        for _ in range(5):  # the median of five flushes of 10,000 rows each at this size
            for r in rows(done, 10_000):
                writer.add(r)
            times.append(writer.flush())
            done += 10_000
        out[f"flush_10k_rows_at_{target}_s"] = round(sorted(times)[2], 4)
    out["ratio"] = round(out["flush_10k_rows_at_1000000_s"] / out["flush_10k_rows_at_100000_s"], 2)
    import pyarrow.dataset as pads

    out["rows_readable"] = pads.dataset(str(dst / "_pidray_manifest.parquet")).count_rows()
    shutil.rmtree(dst)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["dry-run", "ray", "s3", "flush"])
    ap.add_argument("--work", default="/tmp/pidray-bench")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.what == "flush":
        print(flush_bench(work))
        return 0
    w = weights(work)
    if args.what == "dry-run":
        small = dry_run(work, 100_000, w)
        print(small, flush=True)
        big = dry_run(work, 1_000_000, w)
        print(big)
        print(f"RSS 1M / 100k: {big['max_rss_mb'] / small['max_rss_mb']:.2f}")
    elif args.what == "ray":
        print(ray_bench(work, w))
    else:
        print(s3_bench(work, w))
    return 0


if __name__ == "__main__":
    sys.exit(main())
