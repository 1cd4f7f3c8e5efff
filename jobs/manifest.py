"""The job manifest: one Parquet row per input at DST/_pidray_manifest.parquet (written atomically)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_NAME = "_pidray_manifest.parquet"
STAGES = ("read", "decode", "encode", "diffuse", "merge", "write")
SCHEMA = pa.schema(
    [("key", pa.string()), ("status", pa.string()), ("error", pa.string()), ("output_key", pa.string()),
     ("in_bytes", pa.int64()), ("in_h", pa.int64()), ("in_w", pa.int64()), ("out_h", pa.int64()),
     ("out_w", pa.int64()), ("model", pa.string()), ("seed", pa.int64()), ("notes", pa.string())]
    + [(f"t_{s}", pa.float64()) for s in STAGES]
)  # fmt: skip


def manifest_row(row: dict, model: str) -> dict:
    """Flatten a finished stage row (or a skipped/planned one) into the manifest schema."""
    in_hw = row.get("in_hw") or [-1, -1]
    out_hw = row.get("out_hw") or [-1, -1]
    timings = row.get("timings") or {}
    return {
        "key": row["key"],
        "status": row.get("status", "failed"),
        "error": row.get("error", "") or "",
        "output_key": row.get("output_key", "") if row.get("status") in ("ok", "skipped") else "",
        "in_bytes": int(row.get("in_bytes", -1)),
        "in_h": int(in_hw[0]),
        "in_w": int(in_hw[1]),
        "out_h": int(out_hw[0]),
        "out_w": int(out_hw[1]),
        "model": row.get("model", model),
        "seed": int(row.get("seed", -1)),
        "notes": "; ".join(row.get("notes", []) or []) if not isinstance(row.get("notes"), str) else row["notes"],
        **{f"t_{s}": float(timings.get(s, row.get(f"t_{s}", float("nan")))) for s in STAGES},
    }


def write_manifest(dst, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    dst.write(MANIFEST_NAME, buf.getvalue())


def read_manifest(dst) -> list[dict]:
    if not dst.exists(MANIFEST_NAME):
        return []
    return pq.read_table(io.BytesIO(dst.read(MANIFEST_NAME))).to_pylist()


def load_manifest(dst) -> dict[str, dict]:
    return {r["key"]: r for r in read_manifest(dst)}
