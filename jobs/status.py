"""`pidray status DST`: what a bulk job's manifest says, for a finished job or one still running (the manifest
grows by parts as rows finish): counts by status and error kind, throughput, the slowest stage, the first failures."""

from __future__ import annotations

import json
import math
import time
from collections import Counter

from jobs.manifest import MANIFEST_NAME, STAGES, manifest_parts, scan_previous
from pipeline.errors import SetupError
from pipeline.storage import Location, S3Settings

FIRST_FAILURES = 10


def add_status_parser(sub, parents=()) -> None:
    p = sub.add_parser("status", parents=list(parents))  # its summary: pidray.cli.COMMANDS
    p.add_argument("dst", help="the job's DST: folder or s3://bucket/prefix")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--failures", type=int, default=FIRST_FAILURES, help="how many failures to list")
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument("--s3-region", default=None)
    p.set_defaults(fn=cmd_status)


def job_status(dst: Location, failures: int = FIRST_FAILURES) -> dict:
    """The manifest at `dst`, read one record batch at a time: counts, throughput, stage times, first failures."""
    if not manifest_parts(dst):
        raise SetupError(f"no pidray manifest at {dst.uri.rstrip('/')}/{MANIFEST_NAME}")
    status, kinds = Counter(), Counter()
    stage_s = dict.fromkeys(STAGES, 0.0)
    stage_n = dict.fromkeys(STAGES, 0)
    first: list[dict] = []
    nodes = Counter()

    def add(r: dict) -> None:
        status[r["status"]] += 1
        if r["status"] == "failed":
            kinds[r["error_kind"] or "internal"] += 1
            if len(first) < failures:
                first.append({"key": r["key"], "error_kind": r["error_kind"], "error": r["error"]})
        if r["status"] == "ok":
            nodes[r["node"] or "local"] += 1
            for s in STAGES:
                t = r.get(f"t_{s}")
                if isinstance(t, float) and math.isfinite(t):
                    stage_s[s] += t
                    stage_n[s] += 1

    verdict = scan_previous(dst, add)
    parts = manifest_parts(dst)
    stamps = [dst.mtime(k) for k in parts] if hasattr(dst, "mtime") else []
    span = (max(stamps) - min(stamps)) if len(stamps) > 1 else 0.0
    mean = {s: stage_s[s] / stage_n[s] for s in STAGES if stage_n[s]}
    slowest = max(mean, key=mean.get) if mean else ""
    out = {
        "manifest": f"{dst.uri.rstrip('/')}/{MANIFEST_NAME}",
        "parts": len(parts),
        "rows": sum(status.values()),
        "status": dict(status),
        "error_kinds": dict(kinds),
        "images_per_second": status["ok"] / span if span > 0 else None,
        "stage_seconds_mean": mean,
        "slowest_stage": slowest,
        "nodes": dict(nodes),
        "first_failures": first,
        "last_written_s_ago": (time.time() - max(stamps)) if stamps else None,
        "problem": verdict.problem,
    }
    return out


def cmd_status(args) -> int:
    s3 = S3Settings(args.s3_endpoint, args.s3_region)
    st = job_status(Location(args.dst, s3), max(0, args.failures))
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0
    counts = ", ".join(f"{st['status'].get(k, 0)} {k}" for k in ("ok", "failed", "skipped", "interrupted"))
    print(f"{st['manifest']}: {st['rows']} rows ({counts}) in {st['parts']} part(s)")
    if st["error_kinds"]:
        print("failed by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(st["error_kinds"].items())))
    if st["images_per_second"]:
        print(f"throughput: {st['images_per_second']:.2f} images/s (ok rows over the span its parts were written)")
    if st["slowest_stage"]:
        times = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(st["stage_seconds_mean"].items(), key=lambda kv: -kv[1]))
        print(f"slowest stage: {st['slowest_stage']} (mean per image: {times})")
    if st["last_written_s_ago"] is not None:
        print(f"last written {st['last_written_s_ago']:.0f}s ago")
    for f in st["first_failures"]:
        print(f"failed  {f['key']}: [{f['error_kind']}] {f['error']}")
    if st["problem"]:
        print(f"warning: part of the manifest cannot be used: {st['problem']}")
    return 0
