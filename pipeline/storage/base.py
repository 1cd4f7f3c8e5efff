"""`Location`: where inputs come from and outputs go, as one small interface; `LocalLocation` (pipeline.storage.local)
and `S3Location` (pipeline.storage.s3) are its two backends.

`Location(uri, ...)` gives the backend the URI names (s3://bucket/prefix: S3; anything else: a local folder), so a
caller never chooses one. What is the same for both is written here once: the listing's filters (`folders`,
`list`), the bounded read (`read`, `read_versioned`), the checks before any work (`check_listable`,
`check_writable`) and how a location pickles (its clients are built lazily inside each worker from plain settings,
so a `Location` pickles cheaply)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.errors import SetupError, TooLarge, storage_failures
from pipeline.storage.common import (
    MAX_INPUT_BYTES,
    RESERVED_PREFIX,
    Entry,
    FileInfo,
    S3Settings,
    explain_storage_error,
    is_hidden,
    is_image_key,
)

_BACKENDS: dict[bool, type] = {}  # is_s3 -> the backend's class (each registers itself as it is defined)


@dataclass
class Location:
    """A local folder or s3://bucket/prefix. Keys are '/'-separated paths relative to it.

    `Location(uri, ...)` is a `LocalLocation` or an `S3Location`, by the URI; each backend gives the methods below
    that raise NotImplementedError."""

    uri: str
    s3: S3Settings = field(default_factory=S3Settings)
    follow_symlinks: bool = False
    tag: str = ""  # the writing job's id: in the name of its temporaries, so it removes only its own

    is_s3: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "is_s3" in cls.__dict__:  # a backend, not a subclass of one
            _BACKENDS[cls.is_s3] = cls

    def __new__(cls, *args, **kwargs):
        if cls is Location:  # the backend the URI names
            uri = args[0] if args else kwargs.get("uri", "")
            cls = _BACKENDS[str(uri).startswith("s3://")]
        return object.__new__(cls)

    def __post_init__(self):
        self._client = None

    def __getstate__(self):
        return {"uri": self.uri, "s3": self.s3, "follow_symlinks": self.follow_symlinks, "tag": self.tag}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._client = None

    # ------------------------------------------------------------------ what each backend gives
    @property
    def real(self) -> str:
        """Canonical form for comparisons: the resolved local path, or s3://bucket/prefix."""
        raise NotImplementedError

    def identity(self, key: str) -> str:
        """The object a key names, canonically (so two locations' keys can be compared)."""
        raise NotImplementedError

    def single(self) -> tuple[Location, Entry] | None:
        """When the URI names one file or object: (its folder/prefix as a Location, its entry); else None."""
        raise NotImplementedError

    def walk(self, exclude: Location | None) -> Iterator[tuple[str, list[Entry]]]:
        """Every folder/prefix below the location, unfiltered: (folder key, its entries sorted by name); `exclude`
        (DST inside SRC) left out. See `folders`."""
        raise NotImplementedError

    def names(self, folder: str) -> set[str]:
        """The keys of the files (and links) directly in `folder` ("" for the top): one folder's listing, for the
        planner's look at what DST holds already. Empty when the folder does not exist, or (locally) when a link
        on its way leads elsewhere (the listing of the whole location never followed links either)."""
        raise NotImplementedError

    def files(self, folder: str) -> dict[str, FileInfo]:
        """`names`, with what each one is (from the same one listing; locally an `lstat` per entry, never an open):
        its size, its modification time, and whether it is a regular file (not a link, a FIFO, a device)."""
        raise NotImplementedError

    def read_bounded(self, key: str, n: int | None, limit: int) -> tuple[bytes, tuple]:
        """`read_versioned` without its last check: at most limit + 1 bytes of a whole read."""
        raise NotImplementedError

    def open(self, key: str):
        """A seekable binary file of the object, for formats read by parts (a zip's directory): the local file, or
        ranged GETs on S3."""
        raise NotImplementedError

    def write(self, key: str, data: bytes, overwrite: bool = False, expect: tuple | None = None) -> None:
        """Write `key` whole. Unless `overwrite`, an existing file or object at `key` is never replaced: OutputExists
        instead (checked by the storage itself at the moment the file lands, not by an earlier look). expect: with
        `overwrite`, the identity (`FileInfo.identity`) of the file the job planned to replace: anything else there
        now (a file changed or put there since) is kept, and OutputExists raised; nothing there: written as new."""
        raise NotImplementedError

    def size(self, key: str) -> int:
        """The size of the file or object `key` in bytes, -1 when there is none (from a stat / HEAD: nothing read)."""
        raise NotImplementedError

    def mtime(self, key: str) -> float:
        """When `key` was last written (seconds since the epoch; S3: LastModified)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def copy(self, key: str, new_key: str) -> None:
        """A copy of `key` at `new_key` (a backup beside it; S3: a server-side copy)."""
        raise NotImplementedError

    def remove_temporaries(self, tag: str) -> int:
        """Delete the temporary files of job `tag` below the location (local only; S3 writes have none)."""
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes) -> str:
        """Create `key`, whole, only if it does not exist (FileExistsError otherwise); returns a version token (the S3
        ETag; locally the content is the token)."""
        raise NotImplementedError

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, version token) of `key`, or None when it does not exist."""
        raise NotImplementedError

    def replace_versioned(self, key: str, data: bytes, token: str) -> str:
        """Overwrite `key` only if it is still at version `token` (S3: If-Match; FileExistsError when it moved on);
        locally an atomic replace, the caller holding the folder's guard. Returns the new token."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def probe_list(self) -> None:
        """One look that fails as listing would (`check_listable` says why in one line)."""
        raise NotImplementedError

    def probe_write(self, name: str) -> None:
        """Write and delete an empty file named `name` (`check_writable` says why that fails in one line)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the same for both
    def below(self, other: Location) -> bool:
        """True when this location is `other` or lies inside it."""
        if self.is_s3 != other.is_s3:
            return False
        a, b = self.real, other.real
        return a == b or a.startswith(b.rstrip("/") + "/")

    def list(self, images_only: bool = True, exclude: Location | None = None, hidden: bool = False,
             accept=None) -> list[Entry]:  # fmt: skip
        """Every file below the location (sorted by key), leaving out `exclude` when it lies inside: `folders`,
        gathered. Hidden files and symbolic links are listed with a `skip` reason (see `folders`)."""
        out = [e for _, entries in self.folders(images_only, exclude, hidden, accept) for e in entries]
        return sorted(out, key=lambda e: e.key)

    def folders(self, images_only: bool = True, exclude: Location | None = None, hidden: bool = False,
                accept=None) -> Iterator[tuple[str, list[Entry]]]:  # fmt: skip
        """The listing as a stream, one folder/prefix at a time: (folder key, "" for the top, its files sorted by
        name), a folder's files before its subfolders, subfolders in name order; nothing is held beyond the folder
        being listed (local: one `scandir` per folder; S3: `/`-delimited listing pages of one prefix).

        Hidden files (a path segment starting with '.') and symbolic links (unless followed) are listed with a
        `skip` reason, so a caller can record them rather than drop them silently; an unreadable folder is listed
        as an entry with `folder=True`. accept: which keys are inputs (default: images; latent files for `pidray
        decode`). `exclude` (DST inside SRC) is left out."""
        accept = accept or is_image_key
        for folder, entries in self.walk(exclude):
            if images_only:  # an unreadable folder stays listed: it is reported, not silently left out
                entries = [e for e in entries if (accept(e.key) and not e.key.startswith(RESERVED_PREFIX)) or e.folder]
            for e in entries if not hidden else ():
                if not e.skip and is_hidden(e.key):
                    e.skip = "hidden file (a name in its path starts with '.'); --include-hidden processes it"
            if entries:
                yield folder, entries

    def read(self, key: str, n: int | None = None, limit: int = MAX_INPUT_BYTES) -> bytes:
        """The object's bytes, or only its first n (a ranged GET on S3): enough for an image header. A whole read
        is bounded: an object over `limit` bytes is refused (TooLarge) from its size before it is read, and never
        more than limit + 1 bytes are read (it may have grown since)."""
        return self.read_versioned(key, n, limit)[0]

    def read_versioned(self, key: str, n: int | None = None, limit: int = MAX_INPUT_BYTES) -> tuple[bytes, tuple]:
        """`read`, and the version of the object read: (size, mtime in ns, inode) locally, (size, ETag) on S3."""
        data, version = self.read_bounded(key, n, limit)
        if n is None and len(data) > limit:  # it grew after its size was looked at
            raise TooLarge(f"file is over the limit of {limit:,} bytes")
        return data, version

    def check_listable(self) -> None:
        """Raise SetupError (one line: what, where, how to fix) when the location cannot be listed."""
        try:
            self.probe_list()
        except SetupError:
            raise
        except storage_failures() as e:
            raise SetupError(explain_storage_error(e, "list", self.uri, self.s3.endpoint_url)) from e

    def check_writable(self) -> None:
        """A probe write + delete at the location; SetupError with a one-line reason when it fails."""
        try:
            self.probe_write(f"{RESERVED_PREFIX}-probe-{uuid.uuid4().hex}")
        except SetupError:
            raise
        except storage_failures() as e:
            raise SetupError(explain_storage_error(e, "write to", self.uri, self.s3.endpoint_url)) from e
