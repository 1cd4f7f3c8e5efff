"""What both storage backends share: the rules for a key, the listing's entries, S3's settings, and how a storage
failure or a file that is not one is told (`explain_storage_error`, `what_is`, `shown`)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SetupError
from pipeline.receipts import valid_job

MAX_INPUT_BYTES = 1 << 30  # a file larger than this is refused before it is read (no input we take is that big)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
RESERVED_PREFIX = "_pidray"  # the manifest and probe objects at DST


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


def temp_prefix(tag: str) -> str:
    """The name every temporary file of job `tag` starts with (a tag that is not a job id names no job)."""
    return f".pidray-{tag}-" if valid_job(tag) else ".pidray-"


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


def exists_message(key: str) -> str:
    return (
        f"{display(key)!r} appeared in DST after the job was planned (another job, or a person, wrote it): it "
        "is kept, not replaced"
    )
