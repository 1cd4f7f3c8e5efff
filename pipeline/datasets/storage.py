"""Where a dataset's shards and tables are read from and published to: a local folder or an S3 prefix, through the
storage layer (`pipeline.storage.Location`).

- `open_input`: a tar shard is read as a stream (locally the guarded open of `LocalLocation.open`; on S3 one GET whose
  body is read as it arrives), a Parquet table as a seekable file (locally the file; on S3 ranged GETs, one per
  read pyarrow makes: its footer, then each row group's column chunks).
- `publisher`: what an output shard or table is written into and published by. Locally `common.Published` (a
  temporary beside the final name, then a link); on S3 `S3Published`: a temporary on local disk named with the job's
  id, published as one PUT with `If-None-Match: *` when it is at most `PART_BYTES`, else as a multipart upload whose
  completion carries the condition (aborted on any failure), so S3 itself refuses to write over an object that is
  there. Replacing a proven earlier output (`--overwrite`) is conditional on the object's ETag as it was listed.
  Either way the object carries the job's id and its key in its metadata (`pipeline.receipts`): the proof that
  pidray wrote it.
"""

from __future__ import annotations

import io
import os
import tempfile

from pipeline.datasets.common import Published, check_name
from pipeline.errors import BadInput, OutputExists
from pipeline.receipts import s3_receipt, valid_job
from pipeline.storage import PART_BYTES, display, key_problem, temp_prefix

STREAM_READ_BYTES = 1 << 20  # what a tar stream asks of an S3 body at a time (tarfile asks for 10 KiB)


def open_input(location, key: str, seekable: bool):
    """A binary file of `key` in `location` (a `Location`), to use in a `with` block: seekable for a Parquet table,
    a stream for a tar shard."""
    if not location.is_s3 or seekable:
        return location.open(key)  # S3: a seekable file of ranged GETs
    bucket, _ = location.bucket_prefix
    body = location.client.get_object(Bucket=bucket, Key=location.object_key(key))["Body"]
    return io.BufferedReader(_Body(body), STREAM_READ_BYTES)


class _Body(io.RawIOBase):
    """An S3 GET's body as a raw stream: read once, front to back."""

    def __init__(self, body):
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.body.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.body.close()
            finally:
                super().close()


def publisher(location, key: str, tag: str | None, replace: bool = False, etag: str = "", spill_dir=None):
    """What the output at `key` of DST `location` is written into and published by (see the module's docstring).
    replace: the file or object there was proven to be an earlier output of pidray (the caller's --overwrite);
    etag: on S3, the version of it that was listed (the replacement is conditional on it)."""
    problem = key_problem(key, s3=location.is_s3)
    if problem:
        raise BadInput(problem)
    folder, _, name = key.rpartition("/")
    if location.is_s3:
        return S3Published(location, key, tag, replace, etag, spill_dir)
    location._local_path(key)  # proven inside DST after resolving links: a folder that links elsewhere is refused
    return Published(os.path.join(location.uri, folder), name, tag, replace)


class S3Published:
    """An output written to a temporary file on local disk (`spill_dir`, else the system's temporary folder; named
    `.pidray-<job>-XXXXXXXX.part`) and published whole as the S3 object `key` of `location`: `publish()` uploads it
    (see the module's docstring), `discard()` leaves nothing. `name`, `tmp`, `file` and `size` as `Published`'s."""

    def __init__(self, location, key: str, tag: str | None = None, replace: bool = False, etag: str = "",
                 spill_dir: str | None = None):  # fmt: skip
        self.location, self.key, self.tag = location, key, tag or ""
        self.name = check_name(key.rpartition("/")[2])
        self.replace, self.etag = replace, etag
        self.size = -1
        fd, self.tmp = tempfile.mkstemp(dir=spill_dir, prefix=temp_prefix(self.tag), suffix=".part")
        self.file = os.fdopen(fd, "w+b")

    @property
    def path(self) -> str:
        return f"{self.location.uri.rstrip('/')}/{self.key}"

    def publish(self) -> str:
        f = self.file
        f.flush()
        self.size = os.fstat(f.fileno()).st_size
        f.seek(0)
        try:
            self._upload(f)
        finally:
            self.discard()
        return self.path

    discard = Published.discard  # the local temporary closed and removed, as a local output's

    def _upload(self, f) -> None:
        from pipeline.storage.s3 import _precondition_failed

        loc = self.location
        client, (bucket, _) = loc.client, loc.bucket_prefix
        full = loc.object_key(self.key)
        cond = {"IfMatch": self.etag} if self.replace and self.etag else {} if self.replace else {"IfNoneMatch": "*"}
        meta = {"Metadata": s3_receipt(self.tag, self.key)} if valid_job(self.tag) else {}
        try:
            if self.size <= PART_BYTES:
                client.put_object(Bucket=bucket, Key=full, Body=f.read(), **cond, **meta)
                return
            upload = client.create_multipart_upload(Bucket=bucket, Key=full, **meta)["UploadId"]
            try:
                parts = []
                while chunk := f.read(PART_BYTES):
                    n = len(parts) + 1
                    got = client.upload_part(Bucket=bucket, Key=full, UploadId=upload, PartNumber=n, Body=chunk)
                    parts.append({"PartNumber": n, "ETag": got["ETag"]})
                client.complete_multipart_upload(Bucket=bucket, Key=full, UploadId=upload,
                                                 MultipartUpload={"Parts": parts}, **cond)  # fmt: skip
            except BaseException:  # an interrupt included: S3 keeps nothing of it
                try:
                    client.abort_multipart_upload(Bucket=bucket, Key=full, UploadId=upload)
                except Exception:  # a bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes it
                    pass
                raise
        except client.exceptions.ClientError as e:
            if cond and _precondition_failed(e):
                what = "changed in DST since the job looked" if self.replace else "appeared in DST while it was written"
                raise OutputExists(self.key, f"{display(self.key)!r} {what}: it is kept, and this output is not "
                                             "published")  # fmt: skip
            raise
