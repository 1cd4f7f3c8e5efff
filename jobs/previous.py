"""The manifest a job finds at DST, indexed on disk (SQLite in a temporary file) instead of held in memory: a job of
millions of rows looks up each input's earlier row, and each output name's record, as it plans, and carries the
rows it did not plan again into its own manifest at the end, without holding all of them."""

from __future__ import annotations

import os
import pickle
import sqlite3
import tempfile
import weakref
from collections.abc import Iterator

from jobs.manifest import Previous, manifest_parts, proof, scan_previous
from pipeline.errors import storage_failures


class PreviousIndex:
    """The usable rows of DST's manifest by exact key (`rows.get(key)`), the output names it records (`name in
    outputs`), and what was wrong with it (`problem`, `set_aside`, as `Previous` says). Every key the job plans is
    `touch`ed; `untouched()` gives the rest, to be carried over."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="pidray-previous-", suffix=".sqlite")
        os.close(fd)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE rows (k BLOB PRIMARY KEY, out TEXT, row BLOB, touched INTEGER DEFAULT 0);"
        )
        self.problem, self.set_aside, self.count = "", 0, 0
        self.bad: list[str] = []  # parts of a folder manifest that could not be used
        self.rows, self.outputs = _Rows(self), _Outputs(self)
        self._pending: list[tuple] = []
        self._gone = weakref.finalize(self, _remove, self.db, self.path)  # also when a caller never closes it

    @classmethod
    def load(cls, dst) -> PreviousIndex:
        """DST's manifest (a file or a folder of parts), read one record batch at a time."""
        index = cls()
        verdict: Previous = scan_previous(dst, index._add)
        index._commit()
        index.db.execute("CREATE INDEX outs ON rows (out)")
        index.problem, index.set_aside, index.bad = verdict.problem, verdict.set_aside, verdict.bad
        return index

    def _add(self, row: dict) -> None:
        self._pending.append((row["key_bytes"], proof(row) or None, pickle.dumps(row)))  # outputs proven pidray's
        if len(self._pending) >= 10_000:
            self._commit()

    def _commit(self) -> None:
        if self._pending:
            self.db.executemany("INSERT OR REPLACE INTO rows (k, out, row) VALUES (?, ?, ?)", self._pending)
            self._pending = []
        self.count = self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]

    def touch(self, key: str) -> None:
        """`key` is planned again: its old row is superseded (not carried over)."""
        if self.count:
            self.db.execute("UPDATE rows SET touched = 1 WHERE k = ?", (os.fsencode(key),))

    def untouched(self) -> Iterator[dict]:
        """The rows of inputs this job did not plan (gone from SRC, or past --limit): carried over as they were."""
        if not self.count:
            return
        for (blob,) in self.db.execute("SELECT row FROM rows WHERE touched = 0 ORDER BY k"):
            yield pickle.loads(blob)

    def close(self) -> None:
        self._gone()


def _remove(db, path: str) -> None:
    db.close()
    try:
        os.unlink(path)
    except OSError:
        pass


class _Rows:
    def __init__(self, index: PreviousIndex):
        self.index = index

    def get(self, key: str, default=None):
        if not self.index.count:
            return default
        got = self.index.db.execute("SELECT row FROM rows WHERE k = ?", (os.fsencode(key),)).fetchone()
        return pickle.loads(got[0]) if got else default

    def __len__(self) -> int:
        return self.index.count


class _Outputs:
    def __init__(self, index: PreviousIndex):
        self.index = index

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def get(self, name: str, default=None):
        """A row that says a pidray job wrote `name` (jobs.manifest.proof), or `default`."""
        rows = self.all(name)
        return rows[0] if rows else default

    def all(self, name: str) -> list[dict]:
        """Every row that says a pidray job wrote `name` (an input renamed since leaves an older one)."""
        if not self.index.count:
            return []
        got = self.index.db.execute("SELECT row FROM rows WHERE out = ? ORDER BY rowid DESC LIMIT 64", (name,))
        return [pickle.loads(r[0]) for r in got.fetchall()]


def has_manifest(dst) -> bool:
    try:
        return bool(manifest_parts(dst))
    except storage_failures():  # DST cannot be listed now: no manifest to read
        return False
