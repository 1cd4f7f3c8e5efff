"""Where inputs come from and outputs go: a single file, a local folder, or an s3:// prefix (boto3).

Writes are atomic for readers: local files are written to a temporary name and renamed; S3 objects
are one PUT (boto3's managed upload completes a multipart upload only once every part is in).
Clients are built lazily inside each worker from plain settings, so a `Location` pickles cheaply.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


@dataclass
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    retry_mode: str = "standard"  # boto3 retry modes: legacy | standard | adaptive
    max_attempts: int = 5

    def client(self):
        import boto3
        from botocore.config import Config

        session = boto3.Session(profile_name=self.profile) if self.profile else boto3.Session()
        cfg = Config(retries={"mode": self.retry_mode, "max_attempts": self.max_attempts})
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg)


@dataclass
class Location:
    """A file, folder or s3://bucket/prefix. Keys are '/'-separated paths relative to it."""

    uri: str
    s3: S3Settings = field(default_factory=S3Settings)

    def __post_init__(self):
        self._client = None

    def __getstate__(self):
        return {"uri": self.uri, "s3": self.s3}

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
            raise ValueError(f"invalid S3 URI {self.uri!r}: expected s3://bucket/prefix")
        return bucket, prefix.strip("/")

    @property
    def client(self):
        if self._client is None:
            self._client = self.s3.client()
        return self._client

    def _s3_key(self, key: str) -> str:
        prefix = self.bucket_prefix[1]
        return f"{prefix}/{key}" if prefix else key

    def is_single_file(self) -> bool:
        return not self.is_s3 and Path(self.uri).is_file()

    # ------------------------------------------------------------------ listing
    def list(self, images_only: bool = True) -> list[tuple[str, int]]:
        """(relative key, size in bytes) of every object below the location, sorted."""
        out = []
        if self.is_s3:
            bucket, prefix = self.bucket_prefix
            paginator = self.client.get_paginator("list_objects_v2")
            start = f"{prefix}/" if prefix else ""
            for page in paginator.paginate(Bucket=bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    out.append((obj["Key"][len(start) :], int(obj["Size"])))
        elif self.is_single_file():
            p = Path(self.uri)
            out.append((p.name, p.stat().st_size))
        else:
            root = Path(self.uri)
            if not root.is_dir():
                raise FileNotFoundError(f"input not found: {self.uri}")
            for p in root.rglob("*"):
                if p.is_file() and not p.name.startswith("."):
                    out.append((p.relative_to(root).as_posix(), p.stat().st_size))
        if images_only:
            out = [(k, s) for k, s in out if Path(k).suffix.lower() in IMAGE_EXTENSIONS and not k.startswith("_pidray")]
        return sorted(out)

    # ------------------------------------------------------------------ I/O
    def read(self, key: str) -> bytes:
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            return self.client.get_object(Bucket=bucket, Key=self._s3_key(key))["Body"].read()
        path = Path(self.uri) if self.is_single_file() else Path(self.uri) / key
        return path.read_bytes()

    def write(self, key: str, data: bytes) -> None:
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            self.client.upload_fileobj(io.BytesIO(data), bucket, self._s3_key(key))
            return
        path = Path(self.uri) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pidray-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        if self.is_s3:
            bucket, _ = self.bucket_prefix
            try:
                self.client.head_object(Bucket=bucket, Key=self._s3_key(key))
                return True
            except self.client.exceptions.ClientError:
                return False
        return (Path(self.uri) / key).is_file()

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by writers that died mid-write (local folders only)."""
        if self.is_s3 or not Path(self.uri).is_dir():
            return 0
        stale = list(Path(self.uri).rglob(".pidray-*.part"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


def output_key(key: str, extension: str, suffix: str = "") -> str:
    """Mirror the input's relative key; change the extension, add an optional suffix to the stem."""
    p = Path(key)
    return (p.parent / f"{p.stem}{suffix}{extension}").as_posix().removeprefix("./")
