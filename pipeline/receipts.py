"""Receipts: the proof, kept in DST as each output lands, that a pidray job wrote it.

DST's manifest is the record of a job, but it reaches DST by parts, every few seconds: a job killed between two
parts leaves outputs that no manifest row names. Each write therefore leaves its own proof at once:

- locally, one line appended to the writing process's receipt file `DST/.pidray-written-<job id>-<pid>` (the output's
  key and size), after the output is in place;
- on S3, the object's own metadata (`x-amz-meta-pidray-job: <job id>` and a digest of its key in DST), set by the
  same PUT that creates it.

`--resume` keeps an output found in DST only with such a proof (or a manifest row that carries one), and only while
the file is still a regular file of the size written. Receipt files are data: their names are matched exactly, a
line that does not parse is ignored, a file that is not a regular file or is over `MAX_RECEIPTS_BYTES` is not read,
and no line is ever used as a path. A job removes its own receipt files once its manifest is in DST.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat

from pipeline.errors import storage_failures

RECEIPTS_PREFIX = ".pidray-written-"
JOB_ID = re.compile(r"[0-9a-f]{12}")
_NAME = re.compile(r"\.pidray-written-([0-9a-f]{12})-([0-9]{1,10})")
MAX_RECEIPTS_BYTES = 64 << 20  # ~500k outputs per writing process; a larger file is not read
S3_META = "pidray-job"  # the S3 metadata keys (x-amz-meta-pidray-job, ...-pidray-key)
S3_KEY_META = "pidray-key"


def valid_job(job: str) -> bool:
    return isinstance(job, str) and JOB_ID.fullmatch(job) is not None


def add(dst, key: str, size: int) -> bool:
    """Record that this process (of job `dst.tag`) wrote `key`, `size` bytes, in local DST. S3 needs nothing: the
    object carries its job's id. False when the receipt could not be kept (a full disk; something that is not a
    regular file at its name): the output stands, and its manifest row still carries the proof."""
    if dst.is_s3 or not valid_job(dst.tag):
        return False
    line = json.dumps({"key": key, "size": size}, ensure_ascii=True) + "\n"
    path = os.path.join(dst.uri, f"{RECEIPTS_PREFIX}{dst.tag}-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        os.write(fd, line.encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _files(dst, job: str | None = None) -> list[str]:
    """The names of DST's receipt files (of `job` only, when given): exact names, regular files."""
    try:
        with os.scandir(dst.uri) as it:
            found = [e for e in it if _NAME.fullmatch(e.name) and (job is None or e.name.split("-")[2] == job)]
            return [e.path for e in found if e.is_file(follow_symlinks=False)]
    except OSError:
        return []


def read(dst) -> dict[str, tuple[str, int]]:
    """Local DST's receipts: output key -> (job id, size written); the latest line wins."""
    out: dict[str, tuple[str, int]] = {}
    if dst.is_s3:
        return out
    for path in _files(dst):
        job = _NAME.fullmatch(os.path.basename(path)).group(1)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECEIPTS_BYTES:
                continue
            for line in f.read(MAX_RECEIPTS_BYTES + 1).splitlines():
                try:
                    rec = json.loads(line)
                    key, size = rec["key"], rec["size"]
                except (ValueError, TypeError, KeyError, RecursionError):
                    continue
                if isinstance(key, str) and key and type(size) is int and 0 <= size < 1 << 62:
                    out[key] = (job, size)
    return out


def _key_digest(key: str) -> str:
    return hashlib.sha256(os.fsencode(key)).hexdigest()[:32]


def s3_receipt(job: str, key: str) -> dict[str, str]:
    """The metadata an object written by job `job` at `key` (relative to its DST) carries: the key is part of the
    proof, so an object another job wrote into a DST nested below this one proves nothing here."""
    return {S3_META: job, S3_KEY_META: _key_digest(key)}


def s3_job(dst, key: str) -> str:
    """The job id an S3 object at `key` of DST carries, written there as `key` of this DST ("" when none)."""
    bucket, _ = dst.bucket_prefix
    try:
        meta = dst.client.head_object(Bucket=bucket, Key=dst.object_key(key)).get("Metadata") or {}
    except storage_failures():  # gone, not allowed, S3 not reachable: no receipt
        return ""
    job = meta.get(S3_META, "")
    return job if valid_job(job) and meta.get(S3_KEY_META) == _key_digest(key) else ""


def remove(dst, job: str | None) -> None:
    """Delete job `job`'s receipt files (its manifest is in DST and carries the same proof); None: every job's (a
    job that planned every input and finished carried each proof it found into its manifest)."""
    if dst.is_s3 or (job is not None and not valid_job(job)):
        return
    for path in _files(dst, job):
        try:
            os.unlink(path)
        except OSError:
            pass
