"""Writing the job manifest as the job goes: `ManifestWriter` grows it at DST by parts (each written whole under a
temporary name, then renamed into place) and folds them into one file at the end when the job has few rows;
`FileManifest` keeps it in one named file (`--manifest PATH`); when DST cannot take a manifest, it is written to the
current folder instead, and said (`fallback`). The schema, the layout and the reading: `jobs.manifest`."""

from __future__ import annotations

import io
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.manifest import (
    COMPACTING,
    MANIFEST_NAME,
    PART,
    SCHEMA,
    into_place,
    is_folder,
    iter_manifest,
    manifest_parts,
)
from pipeline.errors import PidrayError, storage_failures
from pipeline.storage import display, shown


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
        dst.write(MANIFEST_NAME if not is_folder(parts) else COMPACTING, data, overwrite=True)
        if is_folder(parts):  # one file replaces the parts: the file lands beside them first
            for key in parts:
                dst.delete(key)
            if not _empty_folder(dst):  # files pidray did not make are in it: they stay, and so does the folder
                into_place(dst, COMPACTING, f"{MANIFEST_NAME}/{PART.format(0, 'all')}")
            else:
                into_place(dst, COMPACTING, MANIFEST_NAME)
        return f"{dst.uri.rstrip('/')}/{MANIFEST_NAME}"
    except Exception as e:  # whatever DST raised, the rows are not lost: they go to a file here, and why is said
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
        except storage_failures():  # DST's manifest cannot be listed now: the part is written beside what is there
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
