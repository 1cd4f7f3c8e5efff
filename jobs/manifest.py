"""The job manifest: one Parquet row per input at DST/_pidray_manifest.parquet (written atomically).

Names are stored losslessly: `key` is the printable form (bytes that are not UTF-8 shown as \\xNN) and `key_bytes`
the name's exact bytes, so a folder with any file names still gets its manifest, and --resume maps rows back.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field

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
        "error": _printable(row.get("error", "") or ""),
        "error_kind": row.get("error_kind", "") or ("internal" if status == "failed" else ""),
        "output_key": display(row.get("output_key", "")) if status in ("ok", "skipped") else "",
        "in_bytes": int(row.get("in_bytes", -1)),
        "in_h": int(in_hw[0]),
        "in_w": int(in_hw[1]),
        "out_h": int(out_hw[0]),
        "out_w": int(out_hw[1]),
        "model": row.get("model", model),
        "seed": int(row.get("seed", -1)),
        "notes": _printable(notes if isinstance(notes, str) else "; ".join(notes)),
        "node": row.get("node", "") or "",  # the Ray node that diffused it (a Ray Data job); "" in the local loop
        **{f"t_{s}": float(timings.get(s, row.get(f"t_{s}", float("nan")))) for s in STAGES},
    }


def _printable(text: str) -> str:
    """Text that Parquet can store: a lone surrogate (from a prompt, a message quoting one) shown as \\udXXX."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def manifest_bytes(rows: list[dict], meta: dict[bytes, bytes] | None = None) -> bytes:
    """The manifest file; `meta`: the run's Parquet key-value metadata (jobs/settings.py)."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key_bytes"]), schema=SCHEMA)
    if meta:
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_manifest(dst, rows: list[dict], meta: dict[bytes, bytes] | None = None) -> str:
    """Write the manifest at DST; when DST cannot take it, write it to the current folder. Returns where it went."""
    data = manifest_bytes(rows, meta)
    try:
        dst.write(MANIFEST_NAME, data, overwrite=True)  # the job holds DST's lease: the manifest is its own
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


STATUSES = ("ok", "failed", "skipped", "interrupted")
# columns an older pidray did not write yet: filled in when missing; every other column must be there
LATER_COLUMNS = {"key_bytes", "error_kind", "node", *(f"t_{s}" for s in STAGES)}
MAX_MANIFEST_BYTES = 256 << 20  # ~2 M rows


@dataclass
class Previous:
    """The manifest found at DST: its usable rows by exact key, and why any were set aside ("" when none were)."""

    rows: dict[str, dict] = field(default_factory=dict)
    problem: str = ""
    set_aside: int = 0  # rows not used (all of them when the file itself cannot be used)


def _check_row(r: dict) -> dict:
    """A manifest row as this version writes it, or ValueError naming the first column that does not fit."""
    out = {}
    for f in SCHEMA:
        v = r.get(f.name)
        got = "null" if v is None else type(v).__name__
        if v is None and f.name in LATER_COLUMNS:
            v = {"key_bytes": None, "error_kind": "", "node": ""}.get(f.name, float("nan"))
        elif v is None and f.name in ("error", "error_kind", "output_key", "notes", "node"):
            v = ""
        elif pa.types.is_string(f.type) and not isinstance(v, str):
            raise ValueError(f"column {f.name!r} holds {got}, expected text")
        elif pa.types.is_int64(f.type) and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"column {f.name!r} holds {got}, expected an integer")
        elif pa.types.is_float64(f.type) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"column {f.name!r} holds {got}, expected a number")
        elif f.name == "key_bytes" and not isinstance(v, bytes):
            raise ValueError(f"column 'key_bytes' holds {got}, expected bytes")
        out[f.name] = v
    if not out["key"] or out["status"] not in STATUSES:
        raise ValueError(f"row with key {out['key']!r} and status {out['status']!r}")
    if out["key_bytes"] is None:  # manifests written before names were stored as bytes
        out["key_bytes"] = os.fsencode(out["key"])
    return out


def read_previous(dst) -> Previous:
    """The manifest at DST, checked column by column and row by row: a row that does not fit this version's schema
    (wrong types, nulls, a missing column, a file that is not Parquet at all) is set aside with the reason, so one
    damaged row or a foreign file never stops a job from writing its own manifest."""
    try:
        size = dst.size(MANIFEST_NAME)
        if size < 0:
            return Previous()
        if size > MAX_MANIFEST_BYTES:  # from the listing: never read
            return Previous(problem=f"it is {size:,} bytes, over the limit of {MAX_MANIFEST_BYTES:,}", set_aside=-1)
        data = dst.read(MANIFEST_NAME, MAX_MANIFEST_BYTES + 1)
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:
        return Previous(problem=f"it cannot be read as a pidray manifest ({type(e).__name__}: {e})"[:300], set_aside=-1)
    missing = [f.name for f in SCHEMA if f.name not in table.column_names and f.name not in LATER_COLUMNS]
    if missing:
        return Previous(problem=f"it lacks the column(s) {missing}", set_aside=table.num_rows)
    prev, reasons = Previous(), []
    for r in table.to_pylist():
        try:
            row = _check_row(r)
        except ValueError as e:
            prev.set_aside += 1
            reasons.append(str(e))
            continue
        prev.rows[manifest_key(row)] = row
    if reasons:
        prev.problem = f"{prev.set_aside} of {table.num_rows} rows do not fit (first: {reasons[0]})"
    return prev


def set_aside(dst, prev: Previous) -> str:
    """Keep the manifest found at DST as a backup beside it (its rows were set aside); returns the backup's name."""
    backup = f"{MANIFEST_NAME}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
    dst.copy(MANIFEST_NAME, backup)
    return backup


def load_manifest(dst) -> dict[str, dict]:
    """key -> row of the manifest at DST, every row checked (empty when there is none or it cannot be used)."""
    return read_previous(dst).rows
