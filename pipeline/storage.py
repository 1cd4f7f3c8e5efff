"""Where inputs come from and outputs go: a local folder or an s3:// prefix (boto3).

Safety rules, enforced here and relied on by the planner:
- a key is '/'-separated and relative; one with an empty, '.' or '..' segment, a NUL, or (for S3) a name that is not
  valid UTF-8 is refused (`key_problem`), and a local write is also checked to land inside DST after resolving
  symlinks, so nothing is ever written outside DST;
- listings skip symbolic links unless asked to follow them, report hidden files instead of dropping them silently,
  and leave out DST when it lies inside SRC;
- writes are atomic for readers: local files go to a temporary name and are linked/renamed into place; S3 objects
  are one PUT, or a multipart upload completed only once every part is in;
- writes never replace an existing file unless asked (`overwrite=True`): locally the temporary is hard-linked to
  the final name (which fails when the name exists), on S3 the PUT or the multipart completion carries
  If-None-Match: * — so a file that appears between planning and writing is never clobbered.
Clients are built lazily inside each worker from plain settings, so a `Location` pickles cheaply.

One module, longer than the others: each rule above is written once per backend, and the local and the S3 form of
every operation (list, read, no-clobber write, delete, lease) sit side by side in `Location` so that a change to one
is seen beside the other.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import BadInput, OutputExists, SetupError, TooLarge
from pipeline.receipts import s3_receipt, valid_job

MAX_INPUT_BYTES = 1 << 30  # a file larger than this is refused before it is read (no input we take is that big)
BUCKET_NAME = re.compile(r"[a-zA-Z0-9._-]{1,255}")  # what S3 clients accept (AWS itself: 3-63 of [a-z0-9.-])
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
RESERVED_PREFIX = "_pidray"  # the manifest and probe objects at DST
PART_BYTES = 8 << 20  # S3: an object above this goes up as a multipart upload, in parts of this size


def display(key: str) -> str:
    """A printable form of a key: bytes that are not UTF-8 (surrogate-escaped by the OS layer) shown as \\xNN."""
    return os.fsencode(key).decode("utf-8", "backslashreplace")


def key_problem(key: str, s3: bool = False) -> str | None:
    """Why `key` cannot be mapped safely below a destination, or None when it can."""
    if not key or key.startswith("/"):
        return f"unsafe name {display(key)!r}: an absolute or empty path cannot be placed inside DST"
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"unsafe name {display(key)!r}: empty, '.' or '..' path segments could escape DST"
    if "\x00" in key:
        return f"unsafe name {display(key)!r}: contains a NUL byte"
    if s3:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return f"name {display(key)!r} is not valid UTF-8, which S3 keys must be"
    return None


def is_image_key(key: str) -> bool:
    return Path(key).suffix.lower() in IMAGE_EXTENSIONS


def is_hidden(key: str) -> bool:
    """A path segment that starts with '.' ('.' and '..' are not names but unsafe navigation: see key_problem)."""
    return any(p.startswith(".") and p not in (".", "..") for p in key.split("/"))


@dataclass
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    retry_mode: str = "standard"  # boto3 retry modes: legacy | standard | adaptive
    max_attempts: int = 5
    connect_timeout: float = 10.0

    def client(self, max_attempts: int | None = None):
        import boto3
        from botocore.config import Config

        session = boto3.Session(profile_name=self.profile) if self.profile else boto3.Session()
        cfg = Config(retries={"mode": self.retry_mode, "max_attempts": max_attempts or self.max_attempts},
                     connect_timeout=self.connect_timeout)  # fmt: skip
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg)


@dataclass
class Entry:
    """One listed file: its key relative to the location, its size, and why it is skipped (hidden, symlink)."""

    key: str
    size: int
    skip: str = ""
    note: str = ""
    folder: bool = False  # a folder that could not be read: reported, with its reason
    target: str = ""  # a symbolic link's target (followed or not): the file it names


@dataclass(frozen=True)
class FileInfo:
    """What a listing says of one file: size in bytes, modification time (seconds), and whether it is a regular file
    (locally; every S3 object is one)."""

    size: int
    mtime: float
    regular: bool = True
    etag: str = ""  # S3: the object's version as listed

    def identity(self) -> tuple:
        """What a write that replaces this file checks is still there (`Location.write(expect=...)`)."""
        return (self.size, self.mtime, self.etag)


def explain_storage_error(e: BaseException, action: str, uri: str, endpoint: str | None = None) -> str:
    """One line for an expected storage failure: what, where, how to fix (no botocore jargon beyond the code)."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # local-only installs
        bx = None
    where = f"cannot {action} {uri}"
    if bx is not None:
        if isinstance(e, bx.NoCredentialsError):
            return f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --s3-profile"
        if isinstance(e, bx.ProfileNotFound):
            return f"{where}: {e}; check --s3-profile"
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
            return f"{where}: the S3 endpoint {endpoint or 'AWS'} cannot be reached; check --s3-endpoint and network"
        if isinstance(e, bx.ParamValidationError):  # botocore's report is several lines and a regex: keep the first
            return f"{where}: {str(e).splitlines()[0] if str(e) else 'invalid request parameters'}"
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code, status = str(err.get("Code", "")), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (code == "404" and action.startswith("list")):
                return f"{where}: the bucket does not exist (endpoint {endpoint or 'AWS'}); create it or fix the URI"
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                        "InvalidClientTokenId", "AuthFailure"):  # fmt: skip
                return f"{where}: S3 rejected the credentials ({code}); check AWS_ACCESS_KEY_ID/--s3-profile"
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                return f"{where}: access denied ({code}); the credentials in use lack permission for it"
            return f"{where}: S3 error {code or status}: {err.get('Message', e)}"
        if isinstance(e, bx.BotoCoreError):
            return f"{where}: {e}"
    if isinstance(e, PermissionError):
        return f"{where}: permission denied ({e.strerror}); choose a folder you can write to, or fix its permissions"
    if isinstance(e, OSError):
        return f"{where}: {e.strerror or e}"
    return f"{where}: {type(e).__name__}: {e}"


@dataclass
class Location:
    """A local folder or s3://bucket/prefix. Keys are '/'-separated paths relative to it."""

    uri: str
    s3: S3Settings = field(default_factory=S3Settings)
    follow_symlinks: bool = False
    tag: str = ""  # the writing job's id: in the name of its temporaries, so it removes only its own

    def __post_init__(self):
        self._client = None

    def __getstate__(self):
        return {"uri": self.uri, "s3": self.s3, "follow_symlinks": self.follow_symlinks, "tag": self.tag}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._client = None

    # ------------------------------------------------------------------ parsing
    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket_prefix(self) -> tuple[str, str]:
        rest = self.uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise SetupError(f"invalid S3 URI {self.uri!r}: expected s3://bucket/prefix")
        if not BUCKET_NAME.fullmatch(bucket):
            raise SetupError(f"invalid S3 bucket name {bucket[:80]!r} in {display(self.uri)[:200]!r}: a bucket name is "
                             "1 to 255 letters, digits, '.', '-' or '_' (AWS: 3 to 63 lowercase letters, digits, '.' "
                             "and '-')")  # fmt: skip
        return bucket, prefix.strip("/")

    @property
    def client(self):
        if self._client is None:
            self._client = self.s3.client()
        return self._client

    @property
    def real(self) -> str:
        """Canonical form for comparisons: the resolved local path, or s3://bucket/prefix."""
        if self.is_s3:
            bucket, prefix = self.bucket_prefix
            return f"s3://{bucket}/{prefix}".rstrip("/")
        return os.path.realpath(self.uri)

    def below(self, other: Location) -> bool:
        """True when this location is `other` or lies inside it."""
        if self.is_s3 != other.is_s3:
            return False
        a, b = self.real, other.real
        return a == b or a.startswith(b.rstrip("/") + "/")

    def identity(self, key: str) -> str:
        """The object a key names, canonically (so two locations' keys can be compared)."""
        if self.is_s3:
            return f"{self.real}/{key}"
        return os.path.realpath(os.path.join(self.uri, key))

    def _s3_key(self, key: str) -> str:
        prefix = self.bucket_prefix[1]
        return f"{prefix}/{key}" if prefix else key

    def single(self) -> tuple[Location, Entry] | None:
        """When the URI names one file or object: (its folder/prefix as a Location, its entry); else None."""
        if self.is_s3:
            bucket, prefix = self.bucket_prefix
            if not prefix:
                return None
            page = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/", MaxKeys=1)
            if page.get("KeyCount", 0):
                return None
            try:
                head = self.client.head_object(Bucket=bucket, Key=prefix)
            except self.client.exceptions.ClientError:
                return None
            parent, _, name = prefix.rpartition("/")
            return Location(f"s3://{bucket}/{parent}", self.s3), Entry(name, int(head["ContentLength"]))
        p = Path(self.uri)
        if p.is_file():  # named explicitly: a symlink given as SRC is followed
            return Location(str(p.parent), self.s3, follow_symlinks=True), Entry(p.name, p.stat().st_size)
        return None

    # ------------------------------------------------------------------ listing
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
        walk = self._walk_s3(exclude) if self.is_s3 else self._walk_local(exclude)
        for folder, entries in walk:
            if images_only:  # an unreadable folder stays listed: it is reported, not silently left out
                entries = [e for e in entries if (accept(e.key) and not e.key.startswith(RESERVED_PREFIX)) or e.folder]
            for e in entries if not hidden else ():
                if not e.skip and is_hidden(e.key):
                    e.skip = "hidden file (a name in its path starts with '.'); --include-hidden processes it"
            if entries:
                yield folder, entries

    def names(self, folder: str) -> set[str]:
        """The keys of the files (and links) directly in `folder` ("" for the top): one folder's listing, for the
        planner's look at what DST holds already. Empty when the folder does not exist, or (locally) when a link
        on its way leads elsewhere (the listing of the whole location never followed links either)."""
        rel = f"{folder}/" if folder else ""
        if self.is_s3:
            bucket, prefix = self.bucket_prefix
            start = f"{prefix}/{rel}" if prefix else rel
            out = set()
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start, Delimiter="/")
            for page in pages:
                out.update(rel + obj["Key"][len(start) :] for obj in page.get("Contents", []))
            return out
        path = os.path.join(self.uri, folder) if folder else self.uri
        if folder and os.path.realpath(path) != os.path.join(os.path.realpath(self.uri), folder):
            return set()
        try:
            with os.scandir(path) as it:
                return {rel + e.name for e in it if not e.is_dir(follow_symlinks=False)}
        except OSError:
            return set()

    def files(self, folder: str) -> dict[str, FileInfo]:
        """`names`, with what each one is (from the same one listing; locally an `lstat` per entry, never an open):
        its size, its modification time, and whether it is a regular file (not a link, a FIFO, a device)."""
        rel = f"{folder}/" if folder else ""
        if self.is_s3:
            bucket, prefix = self.bucket_prefix
            start = f"{prefix}/{rel}" if prefix else rel
            out = {}
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start, Delimiter="/")
            for page in pages:
                for obj in page.get("Contents", []):
                    when = obj["LastModified"].timestamp()
                    out[rel + obj["Key"][len(start) :]] = FileInfo(int(obj["Size"]), when, etag=obj.get("ETag", ""))
            return out
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

    def _walk_s3(self, exclude: Location | None) -> Iterator[tuple[str, list[Entry]]]:
        bucket, prefix = self.bucket_prefix
        base = f"{prefix}/" if prefix else ""
        skip_prefix = None
        if exclude is not None and exclude.is_s3 and exclude.real != self.real and exclude.below(self):
            skip_prefix = exclude.bucket_prefix[1] + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        stack = [base]
        while stack:
            start = stack.pop()
            entries, subs = [], []
            for page in paginator.paginate(Bucket=bucket, Prefix=start, Delimiter="/"):
                for obj in page.get("Contents", []):
                    entries.append(Entry(obj["Key"][len(base) :], int(obj["Size"])))
                subs += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            entries.sort(key=lambda e: e.key)
            yield start[len(base) :].rstrip("/"), entries
            stack += sorted((s for s in subs if s != skip_prefix), reverse=True)  # popped in name order

    def _walk_local(self, exclude: Location | None) -> Iterator[tuple[str, list[Entry]]]:
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
    def check_listable(self) -> None:
        """Raise SetupError (one line: what, where, how to fix) when the location cannot be listed."""
        try:
            if self.is_s3:
                bucket, prefix = self.bucket_prefix
                self.s3.client(max_attempts=2).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            elif not os.path.exists(self.uri):
                raise SetupError(f"input not found: {self.uri}")
            elif not os.access(self.uri, os.R_OK | (os.X_OK if os.path.isdir(self.uri) else 0)):
                raise PermissionError(13, "permission denied")
        except SetupError:
            raise
        except Exception as e:
            raise SetupError(explain_storage_error(e, "list", self.uri, self.s3.endpoint_url)) from e

    def check_writable(self) -> None:
        """A probe write + delete at the location; SetupError with a one-line reason when it fails."""
        name = f"{RESERVED_PREFIX}-probe-{uuid.uuid4().hex}"
        try:
            if self.is_s3:
                bucket, _ = self.bucket_prefix
                client = self.s3.client(max_attempts=2)
                client.put_object(Bucket=bucket, Key=self._s3_key(name), Body=b"")
                client.delete_object(Bucket=bucket, Key=self._s3_key(name))
                return
            if os.path.exists(self.uri) and not os.path.isdir(self.uri):
                raise SetupError(f"cannot write to {self.uri}: it is a file; DST must be a folder")
            os.makedirs(self.uri, exist_ok=True)
            probe = os.path.join(self.uri, "." + name)
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except SetupError:
            raise
        except Exception as e:
            raise SetupError(explain_storage_error(e, "write to", self.uri, self.s3.endpoint_url)) from e

    # ------------------------------------------------------------------ I/O
    def read(self, key: str, n: int | None = None, limit: int = MAX_INPUT_BYTES) -> bytes:
        """The object's bytes, or only its first n (a ranged GET on S3): enough for an image header. A whole read
        is bounded: an object over `limit` bytes is refused (TooLarge) from its size before it is read, and never
        more than limit + 1 bytes are read (it may have grown since)."""
        return self.read_versioned(key, n, limit)[0]

    def read_versioned(self, key: str, n: int | None = None, limit: int = MAX_INPUT_BYTES) -> tuple[bytes, tuple]:
        """`read`, and the version of the object read: (size, mtime in ns, inode) locally, (size, ETag) on S3."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            extra = {"Range": f"bytes=0-{n - 1}"} if n else {}
            got = self.client.get_object(Bucket=bucket, Key=self._s3_key(key), **extra)
            size = int(got.get("ContentLength", 0))
            if n is None and size > limit:
                got["Body"].close()
                raise TooLarge(f"file is {size:,} bytes, over the limit of {limit:,}")
            data = got["Body"].read(n if n else limit + 1)
            version = (size, got.get("ETag", ""))
        else:
            with self.open(key) as f:
                st = os.fstat(f.fileno())
                if n is None and st.st_size > limit:
                    raise TooLarge(f"file is {st.st_size:,} bytes, over the limit of {limit:,}")
                data = f.read(n if n else limit + 1)
            version = (st.st_size, st.st_mtime_ns, st.st_ino)
        if n is None and len(data) > limit:  # it grew after its size was looked at
            raise TooLarge(f"file is over the limit of {limit:,} bytes")
        return data, version

    def open(self, key: str):
        """A seekable binary file of the object, for formats read by parts (a zip's directory): the local file, or
        ranged GETs on S3."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            return _RangedObject(self.client, bucket, self._s3_key(key))
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
        """Write `key` whole. Unless `overwrite`, an existing file or object at `key` is never replaced: OutputExists
        instead (checked by the storage itself at the moment the file lands, not by an earlier look). expect: with
        `overwrite`, the identity (`FileInfo.identity`) of the file the job planned to replace: anything else there
        now (a file changed or put there since) is kept, and OutputExists raised; nothing there: written as new."""
        if self.is_s3:
            problem = key_problem(key, s3=True)
            if problem:
                raise BadInput(problem)
            self._put_s3(key, data, overwrite, expect[2] if overwrite and expect and expect[2] else None)
            return
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
                raise OutputExists(key, _exists_message(key)) from None
            os.unlink(tmp)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _put_s3(self, key: str, data: bytes, overwrite: bool, etag: str | None = None) -> None:
        """One PUT, or a multipart upload for a large object; unless `overwrite`, with If-None-Match: * on the PUT
        or on the completion, so S3 itself refuses when the key exists; with `etag`, If-Match on it, so S3 refuses
        when the object changed since it was listed."""
        bucket, _ = self.bucket_prefix
        full = self._s3_key(key)
        cond = {"IfMatch": etag} if etag else {} if overwrite else {"IfNoneMatch": "*"}
        meta = {"Metadata": s3_receipt(self.tag, key)} if valid_job(self.tag) else {}  # the proof of origin
        try:
            if len(data) <= PART_BYTES:
                self.client.put_object(Bucket=bucket, Key=full, Body=data, **cond, **meta)
                return
            upload = self.client.create_multipart_upload(Bucket=bucket, Key=full, **meta)["UploadId"]
            try:
                parts = []
                for n, start in enumerate(range(0, len(data), PART_BYTES), 1):
                    got = self.client.upload_part(Bucket=bucket, Key=full, UploadId=upload, PartNumber=n,
                                                  Body=data[start : start + PART_BYTES])  # fmt: skip
                    parts.append({"PartNumber": n, "ETag": got["ETag"]})
                self.client.complete_multipart_upload(Bucket=bucket, Key=full, UploadId=upload,
                                                      MultipartUpload={"Parts": parts}, **cond)  # fmt: skip
            except BaseException:
                try:
                    self.client.abort_multipart_upload(Bucket=bucket, Key=full, UploadId=upload)
                except Exception:  # the upload expires by the bucket's lifecycle rules, if any
                    pass
                raise
        except self.client.exceptions.ClientError as e:
            if (etag or not overwrite) and _precondition_failed(e):
                raise OutputExists(key, _exists_message(key)) from None
            raise

    def size(self, key: str) -> int:
        """The size of the file or object `key` in bytes, -1 when there is none (from a stat / HEAD: nothing read)."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            try:
                return int(self.client.head_object(Bucket=bucket, Key=self._s3_key(key))["ContentLength"])
            except self.client.exceptions.ClientError:
                return -1
        path = Path(self.uri) / key
        return path.stat().st_size if path.is_file() and not path.is_symlink() else -1

    def mtime(self, key: str) -> float:
        """When `key` was last written (seconds since the epoch; S3: LastModified)."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            return self.client.head_object(Bucket=bucket, Key=self._s3_key(key))["LastModified"].timestamp()
        return os.stat(os.path.join(self.uri, key)).st_mtime

    def exists(self, key: str) -> bool:
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            try:
                self.client.head_object(Bucket=bucket, Key=self._s3_key(key))
                return True
            except self.client.exceptions.ClientError:
                return False
        return (Path(self.uri) / key).is_file()

    def copy(self, key: str, new_key: str) -> None:
        """A copy of `key` at `new_key` (a backup beside it; S3: a server-side copy)."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            self.client.copy_object(Bucket=bucket, Key=self._s3_key(new_key),
                                    CopySource={"Bucket": bucket, "Key": self._s3_key(key)})  # fmt: skip
            return
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
        """Delete the temporary files of job `tag` (this job's, or a dead job's whose lease was taken over) below a
        local folder; another job's are never touched.

        `tag` is data (it may come from a lease file another program wrote): nothing is done unless it is a job id
        as pidray makes them (12 lowercase hex digits), and it never becomes part of a path or a pattern. DST is
        walked without following links (a folder that links elsewhere is never entered), and only regular files
        whose name is exactly one this code gives a temporary of that job (`.pidray-<id>-<8 random>.part`) go."""
        if self.is_s3 or not valid_job(tag) or not os.path.isdir(self.uri):
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
        """Create `key`, whole, only if it does not exist (FileExistsError otherwise); returns a version token (the S3
        ETag; locally the content is the token)."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            try:
                got = self.client.put_object(Bucket=bucket, Key=self._s3_key(key), Body=data, IfNoneMatch="*")
            except self.client.exceptions.ClientError as e:
                if _precondition_failed(e):
                    raise FileExistsError(key) from None
                raise
            return got["ETag"]
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
        """(bytes, version token) of `key`, or None when it does not exist."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            try:
                got = self.client.get_object(Bucket=bucket, Key=self._s3_key(key))
            except self.client.exceptions.NoSuchKey:
                return None
            return got["Body"].read(1 << 20), got["ETag"]
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
        """Overwrite `key` only if it is still at version `token` (S3: If-Match; FileExistsError when it moved on);
        locally an atomic replace, the caller holding the folder's guard. Returns the new token."""
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            try:
                got = self.client.put_object(Bucket=bucket, Key=self._s3_key(key), Body=data, IfMatch=token)
            except self.client.exceptions.ClientError as e:
                if _precondition_failed(e) or e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise FileExistsError(key) from None
                raise
            return got["ETag"]
        self.write(key, data, overwrite=True)
        return ""

    def delete(self, key: str) -> None:
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            self.client.delete_object(Bucket=bucket, Key=self._s3_key(key))
            return
        self._local_path(key).unlink(missing_ok=True)


def temp_prefix(tag: str) -> str:
    """The name every temporary file of job `tag` starts with (a tag that is not a job id names no job)."""
    return f".pidray-{tag}-" if valid_job(tag) else ".pidray-"


_TEMP_TAIL = re.compile(r"[a-z0-9_]{8}\.part")  # what follows temp_prefix in a temporary's name (mkstemp's 8)


LEASE_KEY = ".pidray-lock"  # DST's lease (jobs/lease.py): the job it names is the one job that may write DST


class LeaseLost(SetupError):
    """This job's lease on DST is gone (another job took DST over): it must never write into DST again."""

    def __init__(self, reason: str, said: bool = False):
        super().__init__(reason if said else f"{reason}: this job writes nothing more into DST")
        self.reason = reason


def check_lease(dst: Location, job: str) -> tuple[bytes, str]:
    """The lease file's (bytes, version token) while DST's lease still names job `job`; LeaseLost otherwise. One small
    read, made before each output or manifest file is published, so that a job stalled past its lease (and taken
    over by another job) writes nothing more into DST."""
    where = display(dst.uri)
    try:
        found = dst.read_with_etag(LEASE_KEY)
    except NotAFile as e:
        raise LeaseLost(f"DST {where}'s lease file {LEASE_KEY} is now {e.what}") from None
    if found is None:
        raise LeaseLost(f"DST {where}'s lease file {LEASE_KEY} was removed")
    try:
        info = json.loads(found[0])
    except (ValueError, RecursionError):
        info = None
    holder = info.get("owner") if isinstance(info, dict) else None
    if holder != job:
        raise LeaseLost(f"another job ({shown(holder) if holder is not None else 'none'}) holds DST {where} now")
    return found


def shown(value, cap: int = 64) -> str:
    """A value read from a file another program may have written, as it may be printed: text with every character
    that is not printable escaped (no terminal control sequence gets through), at most `cap` characters."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        try:
            text = repr(value)
        except ValueError:  # an int of more digits than Python prints
            text = "a huge number"
    else:
        text = type(value).__name__
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: cap + 1])
    return out if len(out) <= cap else out[:cap] + "..."


class NotAFile(SetupError):
    """A name that must hold a small file of pidray's (DST's lease) holds something else: a folder, a link, a FIFO,
    a socket or a device. It is never opened, followed or removed."""

    def __init__(self, key: str, what: str):
        super().__init__(f"{key} is {what}, not a file")
        self.key, self.what = key, what


def what_is(path: str, mode: int) -> str:
    """What is at `path`, in words, from its lstat mode."""
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link (to {display(os.readlink(path))[:200]!r})"
        except OSError:
            return "a symbolic link"
    kinds = {stat.S_ISDIR: "a folder (directory)", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}  # fmt: skip
    return next((what for test, what in kinds.items() if test(mode)), "not a regular file")


def _exists_message(key: str) -> str:
    return (
        f"{display(key)!r} appeared in DST after the job was planned (another job, or a person, wrote it): it "
        "is kept, not replaced"
    )


def _precondition_failed(e) -> bool:
    err = e.response.get("Error", {})
    return err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or e.response.get(
        "ResponseMetadata", {}
    ).get("HTTPStatusCode") in (409, 412)


class _RangedObject(io.RawIOBase):
    """An S3 object as a seekable read-only file: each read is one ranged GET (for a few reads by parts)."""

    def __init__(self, client, bucket: str, key: str):
        self.client, self.bucket, self.key, self.pos = client, bucket, key, 0
        self.size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset + (0, self.pos, self.size)[whence])
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        rng = f"bytes={self.pos}-{self.pos + n - 1}"
        data = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=rng)["Body"].read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)
