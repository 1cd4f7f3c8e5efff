"""The job manifest: one Parquet row per input at DST/_pidray_manifest.parquet, written as the job goes.

It is one Parquet dataset that `pyarrow.dataset.dataset(path)` (or `pq.read_table`) reads whatever its size: a
single file for a small job, or a folder of parts for a large one, each part holding the rows finished since the
part before it (written whole under a temporary name, then renamed into place: a reader never sees half a part, and
a job stopped at any moment leaves every row it recorded exactly once). A job that ends with few rows folds its
parts back into one file.

Here: the schema and the row, the layout at DST (one file or a folder of parts), and reading a manifest back (every
row checked; what does not fit set aside). Writing it as the job goes: `jobs.manifest_writer`.

Names are stored losslessly: `key` is the printable form (bytes that are not UTF-8 shown as \\xNN) and `key_bytes`
the name's exact bytes, so a folder with any file names still gets its manifest, and --resume maps rows back.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import storage_failures
from pipeline.storage import display

MANIFEST_NAME = "_pidray_manifest.parquet"
STAGES = ("read", "decode", "encode", "diffuse", "merge", "write", "latent", "generate", "ldm")
SCHEMA = pa.schema(
    [("key", pa.string()), ("key_bytes", pa.binary()), ("status", pa.string()), ("error", pa.string()),
     ("error_kind", pa.string()), ("output_key", pa.string()), ("in_bytes", pa.int64()), ("in_h", pa.int64()),
     ("in_w", pa.int64()), ("out_h", pa.int64()), ("out_w", pa.int64()), ("model", pa.string()),
     ("seed", pa.int64()), ("notes", pa.string()), ("node", pa.string()), ("written_by", pa.string()),
     ("out_bytes", pa.int64()), ("caption", pa.string())]
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
        # the proof that a pidray job wrote `output_key`: that job's id, and the size it wrote (jobs/rules.py)
        "written_by": row.get("written_by", "") or "",
        "out_bytes": int(row.get("out_bytes", -1)),
        "caption": _printable(row.get("caption") or ""),  # the caption PiD was given (a dataset's, or --captions')
        **{f"t_{s}": float(timings.get(s, row.get(f"t_{s}", float("nan")))) for s in STAGES},
    }


def proof(row: dict | None) -> str:
    """The output a manifest row proves a pidray job wrote (its printable key), or "".

    The proof is the row of DST's own manifest that recorded the write: the job's id (`written_by`) beside the output
    key, set by the job whose write stage created that file (no write ever replaces a file it did not make). Rows of
    manifests written before that column existed prove an output when they say `ok`, or `skipped` with the timings
    of the write carried over from one. A row that merely names a file found in DST (an older --resume's `skipped`
    row without timings) proves nothing."""
    if not row or not row.get("output_key"):
        return ""
    if row.get("written_by"):
        return row["output_key"]
    t_write = row.get("t_write")
    legacy = row.get("status") == "ok" or (row.get("status") == "skipped" and isinstance(t_write, float)
                                            and t_write == t_write)  # fmt: skip
    return row["output_key"] if legacy else ""


def _printable(text: str) -> str:
    """Text that Parquet can store: a lone surrogate (from a prompt, a message quoting one) shown as \\udXXX."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


COMPACTING = f"{MANIFEST_NAME}.compacting"  # the single file that replaces a folder of parts, before its rename
PART = "part-{:06d}-{}.parquet"


def is_folder(parts: list[str]) -> bool:
    return bool(parts) and parts[0] != MANIFEST_NAME and parts[0] != COMPACTING


def manifest_parts(dst) -> list[str]:
    """The keys that hold DST's manifest: the single file, or the folder's parts in the order written (a file left
    by a fold into one file that was stopped half way counts as the manifest)."""
    if dst.size(MANIFEST_NAME) >= 0:
        return [MANIFEST_NAME]
    parts = sorted(k for k in dst.names(MANIFEST_NAME) if _is_part(k.rpartition("/")[2]))
    if parts:
        return parts
    return [COMPACTING] if dst.size(COMPACTING) >= 0 else []


def _is_part(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def into_place(dst, key: str, final: str) -> None:
    """Move `key` to `final` (local: a rename, atomic; S3: a copy, then the delete)."""
    if dst.is_s3:
        dst.copy(key, final)
        dst.delete(key)
    else:
        os.replace(os.path.join(dst.uri, key), os.path.join(dst.uri, final))


def iter_manifest(dst, batch: int = 65_536) -> Iterator[dict]:
    """The rows of DST's manifest (a file or a folder of parts), one record batch at a time: never all at once."""
    for key in manifest_parts(dst):
        for b in pq.ParquetFile(io.BytesIO(dst.read(key, MAX_MANIFEST_BYTES + 1))).iter_batches(batch):
            yield from b.to_pylist()


def read_manifest(dst) -> list[dict]:
    return list(iter_manifest(dst))


STATUSES = ("ok", "failed", "skipped", "interrupted")
# columns an older pidray did not write yet: filled in when missing; every other column must be there
LATER_COLUMNS = {"key_bytes", "error_kind", "node", "written_by", "out_bytes", "caption", *(f"t_{s}" for s in STAGES)}
LATER_DEFAULTS = {"key_bytes": None, "error_kind": "", "node": "", "written_by": "", "out_bytes": -1,
                  "caption": ""}  # else NaN  # fmt: skip
MAX_MANIFEST_BYTES = 256 << 20  # ~2 M rows


@dataclass
class Previous:
    """The manifest found at DST: its usable rows by exact key, and why any were set aside ("" when none were)."""

    rows: dict[str, dict] = field(default_factory=dict)
    problem: str = ""
    set_aside: int = 0  # rows not used (all of them when the file itself cannot be used)
    bad: list[str] = field(default_factory=list)  # the parts of a folder that could not be used at all


def _check_row(r: dict) -> dict:
    """A manifest row as this version writes it, or ValueError naming the first column that does not fit."""
    out = {}
    for f in SCHEMA:
        v = r.get(f.name)
        got = "null" if v is None else type(v).__name__
        if v is None and f.name in LATER_COLUMNS:
            v = LATER_DEFAULTS.get(f.name, float("nan"))
        elif v is None and f.name in ("error", "error_kind", "output_key", "notes", "node", "written_by"):
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


def _salvage(r: dict, why: str) -> dict | None:
    """From a row set aside, what still proves its output (`proof`): its key, status, output key and proof fields
    where each has its right type, the rest as a row that failed; None when not even that is there."""
    key, key_bytes, out = r.get("key"), r.get("key_bytes"), r.get("output_key")
    if not isinstance(key, str) or not key or not isinstance(out, str) or not out:
        return None
    if key_bytes is not None and not isinstance(key_bytes, bytes):
        return None
    status = r.get("status") if r.get("status") in STATUSES else "failed"
    row = manifest_row({"key": os.fsdecode(key_bytes) if key_bytes else key, "status": status,
                        "error": f"its earlier row was set aside ({why})"[:300]}, "")  # fmt: skip
    row["output_key"] = out
    for name, kind in (("written_by", str), ("out_bytes", int), ("t_write", float)):
        if type(r.get(name)) is kind:
            row[name] = r[name]
    return row


def read_previous(dst) -> Previous:
    """The manifest at DST, checked column by column and row by row: a row that does not fit this version's schema
    (wrong types, nulls, a missing column, a file that is not Parquet at all) is set aside with the reason, so one
    damaged row or a foreign file never stops a job from writing its own manifest. All its rows, by key: a job
    reads it as a stream instead (`scan_previous`)."""
    rows: dict[str, dict] = {}
    prev = scan_previous(dst, lambda row: rows.__setitem__(manifest_key(row), row))
    prev.rows = rows
    return prev


def scan_previous(dst, add) -> Previous:
    """`read_previous` as a stream: each usable row goes to `add` (a later part's row after an earlier one's), one
    record batch at a time; returns the verdict (problem, rows set aside) with no rows."""
    prev, reasons, total = Previous(), [], 0
    try:
        parts = manifest_parts(dst)
    except storage_failures() as e:
        return Previous(problem=f"it cannot be listed ({type(e).__name__}: {e})"[:300], set_aside=-1)
    for key in parts:
        try:
            size = dst.size(key)
            if size > MAX_MANIFEST_BYTES:  # from the listing: never read
                raise _Unusable(f"it is {size:,} bytes, over the limit of {MAX_MANIFEST_BYTES:,}")
            try:
                f = pq.ParquetFile(io.BytesIO(dst.read(key, MAX_MANIFEST_BYTES + 1)))
            except Exception as e:  # not Parquet, or damaged (pyarrow raises many types): the part is set aside
                raise _Unusable(f"it cannot be read as a pidray manifest ({type(e).__name__}: {e})"[:300]) from None
            names = f.schema_arrow.names
            missing = [c.name for c in SCHEMA if c.name not in names and c.name not in LATER_COLUMNS]
            if missing:
                reasons.append(f"it lacks the column(s) {missing}")
            if not {"key", "status"} <= set(names):  # not a pidray manifest: nothing in it can be used
                prev.set_aside = prev.set_aside + f.metadata.num_rows if prev.set_aside >= 0 else -1
                continue
            for batch in f.iter_batches(65_536):
                for r in batch.to_pylist():
                    total += 1
                    try:
                        if missing:
                            raise ValueError(f"it lacks the column(s) {missing}")
                        add(_check_row(r))
                    except ValueError as e:
                        prev.set_aside += prev.set_aside >= 0
                        reasons.append(str(e))
                        kept = _salvage(r, str(e))
                        if kept is not None:  # what proves its output survives the damage
                            add(kept)
        except Exception as e:  # one part that cannot be used: its rows are set aside, every other part's are kept
            if isinstance(e, _Unusable):
                why = str(e)
            else:
                why = f"it cannot be read as a pidray manifest ({type(e).__name__}: {e})"[:300]
            if not is_folder(parts):
                prev.set_aside = -1
                reasons.append(why)
            else:  # one part of a folder: only its rows are lost; every other part's rows are kept
                prev.bad.append(key)
                reasons.append(f"its part {key.rpartition('/')[2]!r}: {why.removeprefix('it ')}")
    if prev.bad:
        more = f", and {prev.set_aside} row(s) of other parts do not fit" if prev.set_aside > 0 else ""
        prev.problem = f"{len(prev.bad)} of its {len(parts)} parts cannot be used (first: {reasons[0]}){more}"
    elif reasons and prev.set_aside > 0 and not reasons[0].startswith("it "):
        prev.problem = f"{prev.set_aside} of {total} rows do not fit (first: {reasons[0]})"
    elif reasons:
        prev.problem = reasons[0]
    return prev


class _Unusable(Exception):
    pass


def set_aside(dst, prev: Previous) -> str:
    """Keep the manifest found at DST as a backup beside it (its rows were set aside); returns the backup's name
    (a folder of parts is kept part by part under it)."""
    backup = f"{MANIFEST_NAME}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    parts = manifest_parts(dst)
    if not is_folder(parts):  # a copy (the file stays until the new manifest replaces it); moved when it cannot be
        key = parts[0] if parts else MANIFEST_NAME
        size = dst.size(key)
        if 0 <= size <= MAX_MANIFEST_BYTES:
            try:
                dst.copy(key, backup)
                return backup
            except storage_failures():  # not copied: moved below instead
                pass
        into_place(dst, key, backup)  # over the limit (maybe sparse), or not a regular file: never copied
        return backup
    # a folder: the parts that could not be used, moved (their rows are lost anyway), each on its own
    left = []
    for key in [k for k in parts if k in prev.bad] or parts:
        try:
            if not dst.is_s3:
                os.makedirs(os.path.join(dst.uri, backup), exist_ok=True)
            into_place(dst, key, f"{backup}/{key.rpartition('/')[2]}")
        except storage_failures() as e:
            left.append(f"{key.rpartition('/')[2]} ({type(e).__name__})")
    if left:
        raise OSError(f"{backup} holds the bad parts but {', '.join(left)}, which could not be moved")
    return backup


def load_manifest(dst) -> dict[str, dict]:
    """key -> row of the manifest at DST, every row checked (empty when there is none or it cannot be used)."""
    return read_previous(dst).rows
