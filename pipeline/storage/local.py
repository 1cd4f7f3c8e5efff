"""`LocalLocation`: a local folder as a `Location`.

A key is checked to land inside the folder after resolving symlinks before anything is written (`path`), so nothing
is ever written outside DST; listings skip symbolic links unless asked to follow them; a write goes to a temporary
name and is hard-linked into place (which fails when the name exists: no clobber) or renamed with `overwrite`; a
FIFO, a socket or a device at a name is never opened."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import BadInput, OutputExists, SetupError, TooLarge
from pipeline.receipts import valid_job
from pipeline.storage.base import Location
from pipeline.storage.common import (
    Entry,
    FileInfo,
    NotAFile,
    display,
    exists_message,
    is_image_key,
    key_problem,
    temp_prefix,
    what_is,
)

_TEMP_TAIL = re.compile(r"[a-z0-9_]{8}\.part")  # what follows temp_prefix in a temporary's name (mkstemp's 8)


class LocalLocation(Location):
    """A local folder. Keys are '/'-separated paths relative to it."""

    is_s3 = False

    @property
    def real(self) -> str:
        return os.path.realpath(self.uri)

    def identity(self, key: str) -> str:
        return os.path.realpath(os.path.join(self.uri, key))

    def single(self) -> tuple[Location, Entry] | None:
        p = Path(self.uri)
        if p.is_file():  # named explicitly: a symlink given as SRC is followed
            return LocalLocation(str(p.parent), self.s3, follow_symlinks=True), Entry(p.name, p.stat().st_size)
        return None

    # ------------------------------------------------------------------ listing
    def names(self, folder: str) -> set[str]:
        rel = f"{folder}/" if folder else ""
        path = os.path.join(self.uri, folder) if folder else self.uri
        if folder and os.path.realpath(path) != os.path.join(os.path.realpath(self.uri), folder):
            return set()
        try:
            with os.scandir(path) as it:
                return {rel + e.name for e in it if not e.is_dir(follow_symlinks=False)}
        except OSError:
            return set()

    def files(self, folder: str) -> dict[str, FileInfo]:
        rel = f"{folder}/" if folder else ""
        path = os.path.join(self.uri, folder) if folder else self.uri
        if folder and os.path.realpath(path) != os.path.join(os.path.realpath(self.uri), folder):
            return {}
        out = {}
        try:
            with os.scandir(path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    # a folder is listed too (not a regular file): an output name it holds is taken
                    out[rel + e.name] = FileInfo(st.st_size, st.st_mtime, stat.S_ISREG(st.st_mode))
        except OSError:
            return {}
        return out

    def walk(self, exclude: Location | None) -> Iterator[tuple[str, list[Entry]]]:
        root = Path(self.uri)
        if not root.is_dir():
            raise SetupError(f"input not found: {self.uri}")
        skip_dir = exclude.real if exclude is not None and not exclude.is_s3 and exclude.real != self.real else None
        seen = {os.path.realpath(root)}
        stack = [(str(root), "")]
        while stack:
            folder, rel = stack.pop()
            out: list[Entry] = []
            subs: list[tuple[str, str]] = []
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as err:
                yield rel.rstrip("/"), [Entry(rel.rstrip("/") or ".", -1, f"folder cannot be read: {err.strerror}",
                                              folder=True)]  # fmt: skip
                continue
            for e in entries:
                key = rel + e.name
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not self.follow_symlinks:
                        if is_image_key(key):
                            why = f"symbolic link to {target} (not followed; --follow-symlinks follows links)"
                            out.append(Entry(key, -1, skip=why, target=target))
                        continue
                    if os.path.isdir(target):
                        if target in seen or target == skip_dir:
                            continue  # a loop, or DST
                        seen.add(target)
                        subs.append((e.path, key + "/"))
                    elif os.path.isfile(target):
                        out.append(
                            Entry(key, os.stat(target).st_size, note=f"symbolic link to {target}", target=target)
                        )
                    else:  # a link to a FIFO, a device (/dev/zero), or to nothing: on record, never opened
                        what = what_is(target, os.stat(target).st_mode) if os.path.exists(target) else "missing"
                        why = f"symbolic link to {target}, which is {what}, not a regular file"
                        out.append(Entry(key, -1, skip=why, target=target))
                    continue
                if e.is_dir(follow_symlinks=False):
                    if skip_dir is not None and os.path.realpath(e.path) == skip_dir:
                        continue  # DST lies inside SRC: never read our own outputs
                    subs.append((e.path, key + "/"))
                elif e.is_file(follow_symlinks=False):
                    out.append(Entry(key, e.stat(follow_symlinks=False).st_size))
                else:  # a FIFO, a socket, a device: on record, never opened (reading one may block for ever)
                    what = what_is(e.path, e.stat(follow_symlinks=False).st_mode)
                    out.append(Entry(key, -1, skip=f"{what}, not a regular file: it is not read"))
            yield rel.rstrip("/"), out
            stack += reversed(subs)  # popped in name order

    # ------------------------------------------------------------------ checks before any work
    def probe_list(self) -> None:
        if not os.path.exists(self.uri):
            raise SetupError(f"input not found: {self.uri}")
        elif not os.access(self.uri, os.R_OK | (os.X_OK if os.path.isdir(self.uri) else 0)):
            raise PermissionError(13, "permission denied")

    def probe_write(self, name: str) -> None:
        if os.path.exists(self.uri) and not os.path.isdir(self.uri):
            raise SetupError(f"cannot write to {self.uri}: it is a file; DST must be a folder")
        os.makedirs(self.uri, exist_ok=True)
        probe = os.path.join(self.uri, "." + name)
        with open(probe, "wb"):
            pass
        os.unlink(probe)

    # ------------------------------------------------------------------ I/O
    def read_bounded(self, key: str, n: int | None, limit: int) -> tuple[bytes, tuple]:
        with self.open(key) as f:
            st = os.fstat(f.fileno())
            if n is None and st.st_size > limit:
                raise TooLarge(f"file is {st.st_size:,} bytes, over the limit of {limit:,}")
            data = f.read(n if n else limit + 1)
        return data, (st.st_size, st.st_mtime_ns, st.st_ino)

    def open(self, key: str):
        flags = os.O_RDONLY | (0 if self.follow_symlinks else os.O_NOFOLLOW)  # a file swapped for a link is refused
        fd = os.open(os.path.join(self.uri, key), flags | os.O_NONBLOCK)  # a FIFO put at its name cannot hang it
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            what = what_is(os.path.join(self.uri, key), mode)
            raise BadInput(f"{display(key)!r} is {what}, not a regular file: it is not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def _local_path(self, key: str) -> Path:
        """The path for `key`, proven inside the location after resolving every existing symlink."""
        problem = key_problem(key)
        if problem:
            raise BadInput(problem)
        root = os.path.realpath(self.uri)
        path = Path(self.uri) / key
        parent = os.path.realpath(path.parent)
        if parent != root and not parent.startswith(root + os.sep):
            raise BadInput(f"refusing to write {display(key)!r}: it would land outside DST ({parent})")
        return path

    def write(self, key: str, data: bytes, overwrite: bool = False, expect: tuple | None = None) -> None:
        path = self._local_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local_path(key)  # again after creating folders: nothing swapped a folder for a link meanwhile
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(self.tag), suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
            if overwrite and expect is not None:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:  # gone since planning: written as a new file, never over another
                    overwrite = False
                else:
                    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime) != tuple(expect[:2]):
                        raise OutputExists(key, f"{display(key)!r} changed in DST after the job was planned: it is "
                                                "kept, and this input fails")  # fmt: skip
            if overwrite:
                os.replace(tmp, path)  # replaces a link at `path` itself, never what it points to
                return
            try:
                os.link(tmp, path)  # atomic, and fails if anything (a file, a link) is at `path`
            except FileExistsError:
                raise OutputExists(key, exists_message(key)) from None
            os.unlink(tmp)
        except BaseException:  # any failure, an interrupt included: the temporary goes, the error is raised
            Path(tmp).unlink(missing_ok=True)
            raise

    def size(self, key: str) -> int:
        path = Path(self.uri) / key
        return path.stat().st_size if path.is_file() and not path.is_symlink() else -1

    def mtime(self, key: str) -> float:
        return os.stat(os.path.join(self.uri, key)).st_mtime

    def exists(self, key: str) -> bool:
        return (Path(self.uri) / key).is_file()

    def copy(self, key: str, new_key: str) -> None:
        src, dst = self._local_path(key), self._local_path(new_key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        self._local_path(new_key)  # again after creating folders: nothing swapped a folder for a link meanwhile
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BadInput(f"{display(key)!r} is not a regular file: it is not copied")
        with os.fdopen(fd, "rb") as f, open(dst, "xb") as out:
            shutil.copyfileobj(f, out)

    def remove_temporaries(self, tag: str) -> int:
        """Delete the temporary files of job `tag` (this job's, or a dead job's whose lease was taken over) below the
        folder; another job's are never touched.

        `tag` is data (it may come from a lease file another program wrote): nothing is done unless it is a job id
        as pidray makes them (12 lowercase hex digits), and it never becomes part of a path or a pattern. DST is
        walked without following links (a folder that links elsewhere is never entered), and only regular files
        whose name is exactly one this code gives a temporary of that job (`.pidray-<id>-<8 random>.part`) go."""
        if not valid_job(tag) or not os.path.isdir(self.uri):
            return 0
        prefix, n = temp_prefix(tag), 0
        for _, _, names, dirfd in os.fwalk(os.path.realpath(self.uri), follow_symlinks=False):
            for name in names:
                rest = name[len(prefix) :] if name.startswith(prefix) else ""
                if not _TEMP_TAIL.fullmatch(rest):
                    continue
                try:
                    if stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=dirfd)
                        n += 1
                except FileNotFoundError:
                    pass
        return n

    # ------------------------------------------------------------------ conditional writes (the job's lease)
    def create_exclusive(self, key: str, data: bytes) -> str:
        path = self._local_path(key)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(self.tag), suffix=".part")
        try:  # complete before it appears: a reader never sees it half written
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.link(tmp, path)  # atomic, and fails if `key` exists (O_CREAT|O_EXCL, with the content in place)
        finally:
            os.unlink(tmp)
        return ""

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        path = os.path.join(self.uri, key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would block, a link could lead anywhere
            raise NotAFile(key, what_is(path, st.st_mode))
        try:  # O_NONBLOCK: swapped for a FIFO since the look above, the open still returns at once
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError:  # swapped for a link since the look above (ELOOP); anything else is told as it is
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                raise
            raise NotAFile(key, what_is(path, mode)) from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise NotAFile(key, what_is(path, mode))
            return f.read(1 << 20), ""

    def replace_versioned(self, key: str, data: bytes, token: str) -> str:
        self.write(key, data, overwrite=True)
        return ""

    def delete(self, key: str) -> None:
        self._local_path(key).unlink(missing_ok=True)
