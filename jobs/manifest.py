"""The job manifest: one Parquet row per input at DST/_pidray_manifest.parquet (written atomically).

Names are stored losslessly: `key` is the printable form (bytes that are not UTF-8 shown as \\xNN) and `key_bytes`
the name's exact bytes, so a folder with any file names still gets its manifest, and --resume maps rows back.
"""

from __future__ import annotations

import io
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import display

MANIFEST_NAME = "_pidray_manifest.parquet"
STAGES = ("read", "decode", "encode", "diffuse", "merge", "write", "latent", "generate", "ldm")
SCHEMA = pa.schema(
    [("key", pa.string()), ("key_bytes", pa.binary()), ("status", pa.string()), ("error", pa.string()),
     ("error_kind", pa.string()), ("output_key", pa.string()), ("in_bytes", pa.int64()), ("in_h", pa.int64()),
     ("in_w", pa.int64()), ("out_h", pa.int64()), ("out_w", pa.int64()), ("model", pa.string()),
     ("seed", pa.int64()), ("notes", pa.string()), ("node", pa.string())]
    + [(f"t_{s}", pa.float64()) for s in STAGES]
)  # fmt: skip


def manifest_key(row: dict) -> str:
    """The exact key of a manifest row (as the OS layer spells it), whatever its bytes."""
    return os.fsdecode(row["key_bytes"]) if row.get("key_bytes") is not None else row["key"]


def manifest_row(row: dict, model: str) -> dict:
    """Flatten a finished stage row (or a skipped/planned one) into the manifest schema."""
    if "key_bytes" in row:  # already a manifest row
        return row
    in_hw = row.get("in_hw") or [-1, -1]
    out_hw = row.get("out_hw") or [-1, -1]
    timings = row.get("timings") or {}
    notes = row.get("notes") or []
    status = row.get("status", "failed")
    return {
        "key": display(row["key"]),
        "key_bytes": os.fsencode(row["key"]),
        "status": status,
        "error": row.get("error", "") or "",
        "error_kind": row.get("error_kind", "") or ("internal" if status == "failed" else ""),
        "output_key": display(row.get("output_key", "")) if status in ("ok", "skipped") else "",
        "in_bytes": int(row.get("in_bytes", -1)),
        "in_h": int(in_hw[0]),
        "in_w": int(in_hw[1]),
        "out_h": int(out_hw[0]),
        "out_w": int(out_hw[1]),
        "model": row.get("model", model),
        "seed": int(row.get("seed", -1)),
        "notes": notes if isinstance(notes, str) else "; ".join(notes),
        "node": row.get("node", "") or "",  # the Ray node that diffused it (a Ray Data job); "" in the local loop
        **{f"t_{s}": float(timings.get(s, row.get(f"t_{s}", float("nan")))) for s in STAGES},
    }


def manifest_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key_bytes"]), schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_manifest(dst, rows: list[dict]) -> str:
    """Write the manifest at DST; when DST cannot take it, write it to the current folder. Returns where it went."""
    data = manifest_bytes(rows)
    try:
        dst.write(MANIFEST_NAME, data)
        return f"{dst.uri.rstrip('/')}/{MANIFEST_NAME}"
    except Exception:
        fallback = os.path.abspath(f"_pidray_manifest-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.parquet")
        with open(fallback, "wb") as f:
            f.write(data)
        return fallback


def read_manifest(dst) -> list[dict]:
    if not dst.exists(MANIFEST_NAME):
        return []
    return pq.read_table(io.BytesIO(dst.read(MANIFEST_NAME))).to_pylist()


def load_manifest(dst) -> dict[str, dict]:
    """key -> row of the manifest at DST (empty when there is none or it cannot be read)."""
    try:
        rows = read_manifest(dst)
    except Exception:  # an unreadable or older manifest: --resume still trusts the outputs themselves
        return {}
    for r in rows:  # manifests written before names were stored as bytes
        if r.get("key_bytes") is None:
            r["key_bytes"], r["error_kind"] = os.fsencode(r["key"]), r.get("error_kind") or ""
    return {manifest_key(r): r for r in rows}
