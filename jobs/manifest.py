"""The job manifest: one Parquet row per input at DST/_pidray_manifest.parquet, written as the job goes.

It is one Parquet dataset that `pyarrow.dataset.dataset(path)` (or `pq.read_table`) reads whatever its size: a
single file for a small job, or a folder of parts for a large one, each part holding the rows finished since the
part before it (written whole under a temporary name, then renamed into place: a reader never sees half a part, and
a job stopped at any moment leaves every row it recorded exactly once). A job that ends with few rows folds its
parts back into one file.

Names are stored losslessly: `key` is the printable form (bytes that are not UTF-8 shown as \\xNN) and `key_bytes`
the name's exact bytes, so a folder with any file names still gets its manifest, and --resume maps rows back.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PidrayError
from pipeline.storage import display, shown

MANIFEST_NAME = "_pidray_manifest.parquet"
STAGES = ("read", "decode", "encode", "diffuse", "merge", "write", "latent", "generate", "ldm")
SCHEMA = pa.schema(
    [("key", pa.string()), ("key_bytes", pa.binary()), ("status", pa.string()), ("error", pa.string()),
     ("error_kind", pa.string()), ("output_key", pa.string()), ("in_bytes", pa.int64()), ("in_h", pa.int64()),
     ("in_w", pa.int64()), ("out_h", pa.int64()), ("out_w", pa.int64()), ("model", pa.string()),
     ("seed", pa.int64()), ("notes", pa.string()), ("node", pa.string()), ("written_by", pa.string()),
     ("out_bytes", pa.int64())]
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


def manifest_bytes(rows: list[dict], meta: dict[bytes, bytes] | None = None) -> bytes:
    """A manifest file (or part); `meta`: the run's Parquet key-value metadata (jobs/settings.py)."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key_bytes"]), schema=SCHEMA)
    if meta:
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_manifest(dst, rows: list[dict], meta: dict[bytes, bytes] | None = None) -> str:
    """Write the manifest at DST as one file (replacing a folder of parts); when DST cannot take it, write it to the
    current folder. Returns where it went."""
    data = manifest_bytes(rows, meta)
    try:
        parts = manifest_parts(dst)
        if not parts and not dst.is_s3 and os.path.isdir(os.path.join(dst.uri, MANIFEST_NAME)):
            parts = [f"{MANIFEST_NAME}/{PART.format(0, 'all')}"]  # a folder with no parts in it: one goes there
        dst.write(MANIFEST_NAME if not _is_folder(parts) else COMPACTING, data, overwrite=True)
        if _is_folder(parts):  # one file replaces the parts: the file lands beside them first
            for key in parts:
                dst.delete(key)
            if not _empty_folder(dst):  # files pidray did not make are in it: they stay, and so does the folder
                _into_place(dst, COMPACTING, f"{MANIFEST_NAME}/{PART.format(0, 'all')}")
            else:
                _into_place(dst, COMPACTING, MANIFEST_NAME)
        return f"{dst.uri.rstrip('/')}/{MANIFEST_NAME}"
    except Exception as e:
        return _fallback(data, dst, e)


def _empty_folder(dst) -> bool:
    """Local DST's manifest folder, emptied of the temporaries a stopped flush left (the only files pidray makes
    there besides parts) and removed; False when something else is in it (kept, with the folder)."""
    if dst.is_s3:
        return True
    folder = os.path.join(dst.uri, MANIFEST_NAME)
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(".pidray-") and e.name.endswith(".part") and e.is_file(follow_symlinks=False):
                    os.unlink(e.path)
        os.rmdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _fallback(data: bytes, dst=None, why: BaseException | None = None, into: str = "") -> str:
    """Write manifest `data` to a new file in the current folder, and say so (one warning line: where, and why DST
    could not take it). Never replaces a file: two fallbacks in one second get names of their own. `into`: a file an
    earlier fallback of the same job made (and said): its rows and these are written there together, atomically."""
    if into:
        table = pa.concat_tables([pq.read_table(into), pq.read_table(io.BytesIO(data))])
        tmp = f"{into}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, into)
        return into
    stem = os.path.abspath(f"_pidray_manifest-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    for n in range(1000):
        fallback = f"{stem}{f'-{n}' if n else ''}.parquet"
        try:
            with open(fallback, "xb") as f:
                f.write(data)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{stem}.parquet")
    if why is not None:
        from jobs.terminal import _warn

        reason = str(why) if isinstance(why, PidrayError) else f"{type(why).__name__}: {why}"
        reason = shown(" ".join(reason.split()), 300)
        where = f"DST {display(dst.uri)}" if dst is not None else "DST"
        _warn(f"the manifest could not be written into {where} ({reason}); it is written to {fallback} instead")
    return fallback


COMPACTING = f"{MANIFEST_NAME}.compacting"  # the single file that replaces a folder of parts, before its rename
PART = "part-{:06d}-{}.parquet"


def _is_folder(parts: list[str]) -> bool:
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


def _into_place(dst, key: str, final: str) -> None:
    """Move `key` to `final` (local: a rename, atomic; S3: a copy, then the delete)."""
    if dst.is_s3:
        dst.copy(key, final)
        dst.delete(key)
    else:
        os.replace(os.path.join(dst.uri, key), os.path.join(dst.uri, final))


class ManifestWriter:
    """The manifest of a running job, grown by parts: `add` takes finished rows (nothing else is kept), `flush`
    writes the rows since the last flush as one new part, so a flush costs what those rows cost, whatever the job's
    size. The first flush replaces a manifest found at DST (its rows were read before: the job writes each of them
    again or carries it over at the end). `close` writes the last part, and folds the parts into one file when the
    job is small (at most `fold_max` rows)."""

    def __init__(self, dst, tag: str = "", every_s: float = 20.0, fold_max: int = 50_000,
                 meta: dict[bytes, bytes] | None = None):  # fmt: skip
        self.dst, self.tag, self.every_s, self.fold_max = dst, tag or os.urandom(4).hex(), every_s, fold_max
        self.meta = meta  # the run's settings, in every part's Parquet metadata
        self.rows: list[dict] = []  # finished since the last flush
        self.parts: list[str] = []
        self.written = 0
        self.last = time.time()
        self.fallback = ""  # where rows went when DST could not take them
        # pyarrow imports pandas on its first conversion of Python values (0.3-0.6 s here): done while the job
        # works, not after its last image, where a short job's user would wait for it
        threading.Thread(target=pa.array, args=([0],), name="pidray-pyarrow-warm", daemon=True).start()

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def due(self) -> bool:
        return bool(self.rows) and time.time() - self.last >= self.every_s

    def flush(self) -> float:
        """Write the rows since the last flush as one part; returns the seconds it took."""
        t0 = time.time()
        self.last = t0
        if not self.rows:
            return 0.0
        key = f"{MANIFEST_NAME}/{PART.format(len(self.parts), self.tag)}"
        data = manifest_bytes(self.rows, self.meta)
        try:
            if not self.parts:
                self._clear()
            self.dst.write(key, data, overwrite=True)  # S3: one PUT; local: a temporary renamed into place
        except Exception as e:  # DST cannot take it (or is no longer this job's): the rows go elsewhere, said
            self.fallback = _fallback(data, self.dst, e, into=self.fallback)  # one file: said once
        else:
            self.parts.append(key)
        self.written += len(self.rows)
        self.rows = []
        return time.time() - t0

    def _clear(self) -> None:
        """Before the first part: what was at DST's manifest goes (the job read it already)."""
        try:
            old = manifest_parts(self.dst)
        except Exception:
            return
        for key in old:
            self.dst.delete(key)

    def close(self) -> str:
        """The last rows; a small job's parts folded into one file. Returns where the manifest is."""
        if self.fallback:  # DST could not take a part: the last rows go where those went (or into DST, if it can)
            self.flush()
            return self.fallback
        if not self.parts and (self.rows or self.written == 0):
            rows, self.rows = self.rows, []
            self.written += len(rows)
            return write_manifest(self.dst, rows, self.meta)
        self.flush()
        if self.fallback:
            return self.fallback
        if self.written <= self.fold_max:
            return write_manifest(self.dst, list(iter_manifest(self.dst)), self.meta)
        return f"{self.dst.uri.rstrip('/')}/{MANIFEST_NAME}"


class FileManifest:
    """The manifest of a job of one file to one named file: kept in memory and written, at the end, only where
    `--manifest PATH` asks (never beside the output: one file to one file leaves only that file)."""

    def __init__(self, path: str = "", meta: dict[bytes, bytes] | None = None):
        self.path, self.meta, self.rows, self.fallback = path, meta, [], ""

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def due(self) -> bool:
        return False

    def flush(self) -> float:
        return 0.0

    def close(self) -> str:
        if not self.path:
            return ""
        data = manifest_bytes(self.rows, self.meta)
        try:
            with open(self.path, "xb") as f:  # never over a file: the path was checked free before the job
                f.write(data)
        except OSError as e:
            return _fallback(data, None, e)
        return os.path.abspath(self.path)


def iter_manifest(dst, batch: int = 65_536) -> Iterator[dict]:
    """The rows of DST's manifest (a file or a folder of parts), one record batch at a time: never all at once."""
    for key in manifest_parts(dst):
        for b in pq.ParquetFile(io.BytesIO(dst.read(key, MAX_MANIFEST_BYTES + 1))).iter_batches(batch):
            yield from b.to_pylist()


def read_manifest(dst) -> list[dict]:
    return list(iter_manifest(dst))


STATUSES = ("ok", "failed", "skipped", "interrupted")
# columns an older pidray did not write yet: filled in when missing; every other column must be there
LATER_COLUMNS = {"key_bytes", "error_kind", "node", "written_by", "out_bytes", *(f"t_{s}" for s in STAGES)}
LATER_DEFAULTS = {"key_bytes": None, "error_kind": "", "node": "", "written_by": "", "out_bytes": -1}  # else NaN
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
    except Exception as e:
        return Previous(problem=f"it cannot be listed ({type(e).__name__}: {e})"[:300], set_aside=-1)
    for key in parts:
        try:
            size = dst.size(key)
            if size > MAX_MANIFEST_BYTES:  # from the listing: never read
                raise _Unusable(f"it is {size:,} bytes, over the limit of {MAX_MANIFEST_BYTES:,}")
            try:
                f = pq.ParquetFile(io.BytesIO(dst.read(key, MAX_MANIFEST_BYTES + 1)))
            except Exception as e:
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
        except Exception as e:
            if isinstance(e, _Unusable):
                why = str(e)
            else:
                why = f"it cannot be read as a pidray manifest ({type(e).__name__}: {e})"[:300]
            if not _is_folder(parts):
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
    if not _is_folder(parts):  # a copy (the file stays until the new manifest replaces it); moved when it cannot be
        key = parts[0] if parts else MANIFEST_NAME
        size = dst.size(key)
        if 0 <= size <= MAX_MANIFEST_BYTES:
            try:
                dst.copy(key, backup)
                return backup
            except Exception:
                pass
        _into_place(dst, key, backup)  # over the limit (maybe sparse), or not a regular file: never copied
        return backup
    # a folder: the parts that could not be used, moved (their rows are lost anyway), each on its own
    left = []
    for key in [k for k in parts if k in prev.bad] or parts:
        try:
            if not dst.is_s3:
                os.makedirs(os.path.join(dst.uri, backup), exist_ok=True)
            _into_place(dst, key, f"{backup}/{key.rpartition('/')[2]}")
        except Exception as e:
            left.append(f"{key.rpartition('/')[2]} ({type(e).__name__})")
    if left:
        raise OSError(f"{backup} holds the bad parts but {', '.join(left)}, which could not be moved")
    return backup


def load_manifest(dst) -> dict[str, dict]:
    """key -> row of the manifest at DST, every row checked (empty when there is none or it cannot be used)."""
    return read_previous(dst).rows
