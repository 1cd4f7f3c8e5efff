"""`S3Location`: an s3://bucket/prefix (boto3) as a `Location`.

A key must be valid UTF-8 (`key_problem(key, s3=True)`); an object is written with one PUT, or a multipart upload
completed only once every part is in, so a reader never sees half of it; unless asked to overwrite, the PUT or the
completion carries If-None-Match: * (and a planned replacement If-Match on the ETag it listed), so S3 itself refuses
to clobber an object that appeared since planning. The client is built lazily, in each worker, from `S3Settings`."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

from pipeline.errors import BadInput, OutputExists, SetupError, TooLarge
from pipeline.receipts import s3_receipt, valid_job
from pipeline.storage.base import Location
from pipeline.storage.common import Entry, FileInfo, display, exists_message, key_problem

BUCKET_NAME = re.compile(r"[a-zA-Z0-9._-]{1,255}")  # what S3 clients accept (AWS itself: 3-63 of [a-z0-9.-])
PART_BYTES = 8 << 20  # an object above this goes up as a multipart upload, in parts of this size


class S3Location(Location):
    """s3://bucket/prefix. Keys are '/'-separated paths relative to the prefix."""

    is_s3 = True

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
        bucket, prefix = self.bucket_prefix
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def identity(self, key: str) -> str:
        return f"{self.real}/{key}"

    def object_key(self, key: str) -> str:
        """The object's key in the bucket: the prefix and `key`."""
        prefix = self.bucket_prefix[1]
        return f"{prefix}/{key}" if prefix else key

    def single(self) -> tuple[Location, Entry] | None:
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
        return S3Location(f"s3://{bucket}/{parent}", self.s3), Entry(name, int(head["ContentLength"]))

    # ------------------------------------------------------------------ listing
    def _pages(self, folder: str) -> tuple[str, str, Iterator[dict]]:
        """(folder key with its '/', the prefix listed, the `/`-delimited listing pages of one folder)."""
        bucket, prefix = self.bucket_prefix
        rel = f"{folder}/" if folder else ""
        start = f"{prefix}/{rel}" if prefix else rel
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start, Delimiter="/")
        return rel, start, pages

    def names(self, folder: str) -> set[str]:
        rel, start, pages = self._pages(folder)
        out = set()
        for page in pages:
            out.update(rel + obj["Key"][len(start) :] for obj in page.get("Contents", []))
        return out

    def files(self, folder: str) -> dict[str, FileInfo]:
        rel, start, pages = self._pages(folder)
        out = {}
        for page in pages:
            for obj in page.get("Contents", []):
                when = obj["LastModified"].timestamp()
                out[rel + obj["Key"][len(start) :]] = FileInfo(int(obj["Size"]), when, etag=obj.get("ETag", ""))
        return out

    def walk(self, exclude: Location | None) -> Iterator[tuple[str, list[Entry]]]:
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

    # ------------------------------------------------------------------ checks before any work
    def probe_list(self) -> None:
        bucket, prefix = self.bucket_prefix
        self.s3.client(max_attempts=2).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)

    def probe_write(self, name: str) -> None:
        bucket, _ = self.bucket_prefix
        client = self.s3.client(max_attempts=2)
        client.put_object(Bucket=bucket, Key=self.object_key(name), Body=b"")
        client.delete_object(Bucket=bucket, Key=self.object_key(name))

    # ------------------------------------------------------------------ I/O
    def read_bounded(self, key: str, n: int | None, limit: int) -> tuple[bytes, tuple]:
        bucket, _ = self.bucket_prefix
        extra = {"Range": f"bytes=0-{n - 1}"} if n else {}
        got = self.client.get_object(Bucket=bucket, Key=self.object_key(key), **extra)
        size = int(got.get("ContentLength", 0))
        if n is None and size > limit:
            got["Body"].close()
            raise TooLarge(f"file is {size:,} bytes, over the limit of {limit:,}")
        data = got["Body"].read(n if n else limit + 1)
        return data, (size, got.get("ETag", ""))

    def open(self, key: str):
        bucket, _ = self.bucket_prefix
        return _RangedObject(self.client, bucket, self.object_key(key))

    def write(self, key: str, data: bytes, overwrite: bool = False, expect: tuple | None = None) -> None:
        problem = key_problem(key, s3=True)
        if problem:
            raise BadInput(problem)
        self._put(key, data, overwrite, expect[2] if overwrite and expect and expect[2] else None)

    def _put(self, key: str, data: bytes, overwrite: bool, etag: str | None = None) -> None:
        """One PUT, or a multipart upload for a large object; unless `overwrite`, with If-None-Match: * on the PUT
        or on the completion, so S3 itself refuses when the key exists; with `etag`, If-Match on it, so S3 refuses
        when the object changed since it was listed."""
        bucket, _ = self.bucket_prefix
        full = self.object_key(key)
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
            except BaseException:  # an interrupt included: S3 keeps nothing of it
                try:
                    self.client.abort_multipart_upload(Bucket=bucket, Key=full, UploadId=upload)
                except Exception:  # the upload expires by the bucket's lifecycle rules, if any
                    pass
                raise
        except self.client.exceptions.ClientError as e:
            if (etag or not overwrite) and _precondition_failed(e):
                raise OutputExists(key, exists_message(key)) from None
            raise

    def size(self, key: str) -> int:
        bucket, _ = self.bucket_prefix
        try:
            return int(self.client.head_object(Bucket=bucket, Key=self.object_key(key))["ContentLength"])
        except self.client.exceptions.ClientError:
            return -1

    def mtime(self, key: str) -> float:
        bucket, _ = self.bucket_prefix
        return self.client.head_object(Bucket=bucket, Key=self.object_key(key))["LastModified"].timestamp()

    def exists(self, key: str) -> bool:
        bucket, _ = self.bucket_prefix
        try:
            self.client.head_object(Bucket=bucket, Key=self.object_key(key))
            return True
        except self.client.exceptions.ClientError:
            return False

    def copy(self, key: str, new_key: str) -> None:
        bucket, _ = self.bucket_prefix
        self.client.copy_object(Bucket=bucket, Key=self.object_key(new_key),
                                CopySource={"Bucket": bucket, "Key": self.object_key(key)})  # fmt: skip

    def remove_temporaries(self, tag: str) -> int:
        return 0  # an S3 write is one PUT or a multipart upload: it leaves no temporary object

    # ------------------------------------------------------------------ conditional writes (the job's lease)
    def create_exclusive(self, key: str, data: bytes) -> str:
        bucket, _ = self.bucket_prefix
        try:
            got = self.client.put_object(Bucket=bucket, Key=self.object_key(key), Body=data, IfNoneMatch="*")
        except self.client.exceptions.ClientError as e:
            if _precondition_failed(e):
                raise FileExistsError(key) from None
            raise
        return got["ETag"]

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        bucket, _ = self.bucket_prefix
        try:
            got = self.client.get_object(Bucket=bucket, Key=self.object_key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return got["Body"].read(1 << 20), got["ETag"]

    def replace_versioned(self, key: str, data: bytes, token: str) -> str:
        bucket, _ = self.bucket_prefix
        try:
            got = self.client.put_object(Bucket=bucket, Key=self.object_key(key), Body=data, IfMatch=token)
        except self.client.exceptions.ClientError as e:
            if _precondition_failed(e) or e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileExistsError(key) from None
            raise
        return got["ETag"]

    def delete(self, key: str) -> None:
        bucket, _ = self.bucket_prefix
        self.client.delete_object(Bucket=bucket, Key=self.object_key(key))


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
