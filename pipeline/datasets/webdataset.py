"""WebDataset shards: tar files whose members are grouped into samples by key (`dir/key.ext`: the member's folder and
its file name up to the first '.'; consecutive members with one key make one sample).

`ShardReader` streams the samples of a shard from a file object (plain or gzip/bz2/xz-compressed tar), holding one
sample at a time: a shard of any size reads in bounded memory. Each sample is checked on its own and a bad one
becomes a failure record with its reason while the shard goes on: a member named outside the shard (`../x`, `/x`),
a link, device or other non-file member, a repeated member, too many members, a member or sample over the size
limits, no image, a caption that is not text. A shard that breaks part-way (truncated, a size header that lies, data
after its end) ends with one record saying where; the samples before it were read whole. A file that is not a tar is
one such record at its start.

`ShardWriter` assembles an output shard in input order from samples given in any order (those ahead of their turn
wait on local disk), each sample's members byte for byte with the image member replaced, and publishes it whole and
atomically (`common.Published`). A sample that failed is left out of the output shard (it is in the manifest).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

from pipeline import safejson
from pipeline.datasets.common import (
    MAX_JSON_BYTES,
    MAX_META_BYTES,
    MAX_NAME_BYTES,
    Limits,
    OrderedWriter,
    Sample,
    check_caption,
    failure,
    sample_id,
)
from pipeline.errors import BadInput, BadParameter, TooLarge, kind_of

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image member when none is named: the first of these a sample has
LATENT_KEYS = ("safetensors", "npy", "npz")  # the latent member (`pidray decode`) when none is named
DEFAULT_CAPTION_KEY = "txt"
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)  # fmt: skip
_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
          tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
          tarfile.GNUTYPE_SPARSE: "a sparse file"}  # fmt: skip


class BrokenShard(BadInput):
    """The tar cannot be read on from here (the records before it stand)."""


class _StrictInfo(tarfile.TarInfo):
    """tarfile's member header, strict where tarfile is lenient: a header that fails its checksum after the first
    is a broken shard (tarfile takes it for the end of the archive and would drop the rest silently), the end of
    the file without the end-of-archive blocks is a truncated shard, and an extended header (read whole) is
    bounded."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a block of zeros: the end-of-archive marker
            raise
        except tarfile.EmptyHeaderError:
            if tar.offset == 0:
                raise
            raise BrokenShard(f"the tar ends at byte {tar.offset:,} without its end-of-archive blocks (truncated?)")
        except tarfile.HeaderError as e:
            if tar.offset == 0:
                raise
            raise BrokenShard(f"bad tar header at byte {tar.offset:,} ({e}): a member's size header is wrong, or "
                              "the file is damaged")  # fmt: skip

    def _proc_member(self, tar):
        if self.size < 0:
            raise BrokenShard(f"the tar header at byte {self.offset:,} gives a negative size")
        if self.type in _META_TYPES and self.size > MAX_META_BYTES:
            raise BrokenShard(f"an extended tar header at byte {self.offset:,} claims {self.size:,} bytes, over the "
                              f"limit of {MAX_META_BYTES:,}")  # fmt: skip
        return super()._proc_member(tar)


def split_name(name: str) -> tuple[str, str] | None:
    """A member's (key, extension) as WebDataset groups them: the folder and the file name up to its first '.', and
    the rest; None for a name that makes no key (no extension, or a file name that starts with '.')."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext


def name_problem(name: str) -> str | None:
    """Why a member's name is refused, or None."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"member name over {MAX_NAME_BYTES:,} bytes"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"member name {name.encode('utf-8', 'surrogateescape')!r} is not UTF-8"
    if name.startswith("/"):
        return f"member {name!r} has an absolute name"
    if any(p in ("", ".", "..") for p in name.split("/")) or "\\" in name:
        return f"member {name!r} has an unsafe name ('..', '.', '\\' or an empty folder)"
    return None


def parse_caption_key(caption_key: str | None) -> tuple[str, list[str]] | None:
    """`txt` (a member's text), `json:FIELD` (a field of a JSON member; `json:a.b` for a nested one), or None."""
    if caption_key is None:
        return None
    if not isinstance(caption_key, str) or not caption_key.strip(":. "):
        raise BadParameter(f"caption key must be an extension such as txt, or json:FIELD, got {caption_key!r}")
    ext, colon, path = caption_key.partition(":")
    fields = path.split(".") if colon else []
    if not ext or "/" in ext or (colon and not all(fields)):
        raise BadParameter(f"caption key must be an extension such as txt, or json:FIELD, got {caption_key!r}")
    return ext, fields


class ShardReader:
    """The samples of one tar shard, streamed: `for sample in ShardReader(f, "00000.tar")`. `name` is the shard's
    name in the manifest's ids (`00000.tar#key`); `image_key` the input member's extension (None: the first of
    `keys` the sample has: jpg/jpeg/png/webp, or for latents LATENT_KEYS); `caption_key` `txt` or `json:FIELD` (None:
    no caption); `what` names the input member in errors ("image", "latent")."""

    def __init__(self, fileobj, name: str, image_key: str | None = None, caption_key: str | None = DEFAULT_CAPTION_KEY,
                 limits: Limits | None = None, keys: tuple[str, ...] = IMAGE_KEYS, what: str = "image"):  # fmt: skip
        if image_key is not None and (not isinstance(image_key, str) or not image_key or "/" in image_key):
            raise BadParameter(f"{what} key must be an extension such as {keys[0]}, got {image_key!r}")
        self.fileobj, self.name, self.what = fileobj, name, what
        self.image_keys = (image_key.lower(),) if image_key else keys
        self.caption = parse_caption_key(caption_key)
        self.limits = limits or Limits()

    def __iter__(self) -> Iterator[Sample]:
        try:
            tar = tarfile.open(fileobj=self.fileobj, mode="r|*", tarinfo=_StrictInfo, encoding="utf-8",
                               errors="surrogateescape")  # fmt: skip
        except (tarfile.TarError, EOFError, OSError) as e:
            yield failure(self.name, "", 0, BrokenShard(f"not a tar file ({e})"), broken=True)
            return
        try:
            yield from self._samples(tar)
        finally:
            try:
                tar.close()  # the stream's own state; the file object is the caller's
            except (tarfile.TarError, OSError, EOFError):
                pass

    def _samples(self, tar) -> Iterator[Sample]:
        seq, current = 0, None  # the sample being assembled: [key, members, error, mtime, bytes held]
        seen: set[int] = set()  # hashes of the keys met (a key must not come back later in the shard)
        try:
            while True:
                member = tar.next()
                tar.members = []  # tarfile keeps every header it read: a million members would be held
                if member is None:
                    self._check_end(tar)
                    break
                if member.isdir():
                    continue  # folders are structure, not members of a sample
                split = split_name(member.name)
                if split is None or name_problem(member.name):
                    key = member.name  # a record of its own, named as the member is
                elif current is not None and split[0] == current[0]:
                    self._add(tar, member, split[1], current)
                    continue
                else:
                    key = split[0]
                if current is not None:
                    yield self._finish(seq, current)
                    seq += 1
                current = [key, [], None, int(member.mtime), 0]
                if split is None:
                    current[2] = f"member {member.name!r} names no sample (no key.extension): it is not part of one"
                elif problem := name_problem(member.name):
                    current[2] = problem
                elif hash(key) in seen:
                    current[2] = f"key {key!r} comes back after other samples: its members must be together"
                else:
                    seen.add(hash(key))
                    self._add(tar, member, split[1], current)
        except Exception as e:  # tarfile.ReadError, zlib errors, BrokenShard, RecursionError (chained pax headers)
            where = f"in sample {current[0]!r}: " if current else ""
            msg = str(e) if isinstance(e, BrokenShard) else f"{type(e).__name__}: {e}"
            yield failure(sample_id(self.name, current[0]) if current else self.name, current[0] if current else "",
                          seq, BrokenShard(f"shard broken {where}{msg}; the samples before it are kept"),
                          broken=True)  # fmt: skip
            return
        if current is not None:
            yield self._finish(seq, current)

    def _add(self, tar, member, ext: str, current: list) -> None:
        """The member's bytes into the sample being assembled, unless it or the sample is refused (then its bytes
        are passed over unread and the sample keeps only its reason)."""
        if current[2] is not None:
            return
        lim = self.limits
        problem = None
        if not member.isreg() or member.type in _KINDS:
            what = _KINDS.get(member.type, f"of tar type {member.type!r}")
            problem = f"member {member.name!r} is {what}: only regular files are taken"
        elif any(e == ext for e, _ in current[1]):
            problem = f"member {member.name!r} is repeated in its sample"
        elif len(current[1]) >= lim.members:
            problem = f"the sample has more than {lim.members} members"
        elif member.size > lim.member_bytes:
            problem = TooLarge(f"member {member.name!r} is {member.size:,} bytes, over the limit of "
                               f"{lim.member_bytes:,}")  # fmt: skip
        elif current[4] + member.size > lim.sample_bytes:
            problem = TooLarge(f"the sample's members are over {lim.sample_bytes:,} bytes together")
        if problem is not None:
            current[1], current[2] = [], problem
            return
        f = tar.extractfile(member)
        data = f.read(member.size) if f is not None else b""
        if len(data) != member.size:
            raise BrokenShard(f"member {member.name!r} ends early (truncated?)")
        current[1].append((ext, data))
        current[4] += len(data)

    def _finish(self, seq: int, current: list) -> Sample:
        key, members, problem, mtime, _ = current
        sid = sample_id(self.name, key)
        if problem is None:
            try:
                return self._sample(sid, key, seq, members, mtime)
            except Exception as e:  # BadInput / TooLarge from the caption; a bug costs the sample only
                problem = e
        return failure(sid, key, seq, problem, kind_of(problem) if isinstance(problem, Exception) else None)

    def _sample(self, sid: str, key: str, seq: int, members: list, mtime: int) -> Sample:
        by_ext = {ext.lower(): (ext, data) for ext, data in reversed(members)}  # the first of each, case-blind
        image = next((by_ext[k] for k in self.image_keys if k in by_ext), None)
        if image is None:
            have = ", ".join(ext for ext, _ in members[:8]) or "none"
            raise BadInput(f"no {self.what} member (looked for {'/'.join(self.image_keys)}; the sample has {have})")
        return Sample(id=sid, key=key, seq=seq, image=image[1], caption=self._caption(key, members), mtime=mtime,
                      image_ext=image[0], members=members)  # fmt: skip

    def _caption(self, key: str, members: list) -> str | None:
        if self.caption is None:
            return None
        ext, fields = self.caption
        data = next((d for e, d in members if e == ext), None)
        if data is None:
            return None
        what = f"member {key}.{ext}"
        if not fields:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput(f"caption {what} is not UTF-8 text") from None
            return check_caption(text.strip(), f"caption {what}", self.limits.caption_bytes)
        value = safejson.loads(data, what, MAX_JSON_BYTES)
        for f in fields:
            if not isinstance(value, dict):
                return None
            value = value.get(f)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadInput(f"caption field {'.'.join(fields)!r} of {what} is {type(value).__name__}, not text")
        return check_caption(value.strip(), f"caption field {'.'.join(fields)!r} of {what}", self.limits.caption_bytes)

    def _check_end(self, tar) -> None:
        """After the end-of-archive blocks, only zeros (the padding to a full record): data there means a member's
        size header pointed into a block of zeros and the members after it would be lost."""
        while chunk := tar.fileobj.read(1 << 16):
            if chunk.count(0) != len(chunk):
                raise BrokenShard("data after the tar's end-of-archive blocks (a member's size header is wrong?)")


def output_members(sample: Sample, image: bytes, ext: str) -> list[tuple[str, bytes]]:
    """The sample's members in shard order, its image member's bytes replaced by `image` and its extension by `ext`
    (the output format's: `.png`, `jpg`); BadInput when that extension is another member's."""
    ext = ext.lstrip(".")
    out = [(ext, image) if e == sample.image_ext else (e, d) for e, d in sample.members]
    if sum(e == ext for e, _ in out) > 1:
        raise BadInput(f"the output image {sample.key}.{ext} would repeat another member of the sample")
    return out


class ShardWriter(OrderedWriter):
    """An output shard at `folder/name`, assembled in input order: `put(seq, key, members)` each sample kept (any
    order: those ahead of their turn wait on local disk in `spill_dir`), `skip(seq)` each one left out, then
    `close()` publishes it whole (`common.Published`), or `abort()` leaves nothing. `tag`: the job's id, in the
    temporary's name."""

    unit, whole = "sample(s)", "shard"

    def __init__(self, folder: str | None, name: str, tag: str | None = None, spill_dir: str | None = None,
                 replace: bool = False, out=None):  # fmt: skip
        super().__init__(folder, name, tag, spill_dir, replace, out)
        self.inner = tarfile.open(fileobj=self.out.file, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8")
        self.written = 0

    def put(self, seq: int, key: str, members: list[tuple[str, bytes]], mtime: int = 0) -> None:
        if name_problem(f"{key}.x") or split_name(f"{key}.x") != (key, "x"):
            raise BadInput(f"unsafe sample key {key!r}")
        self.order.put(seq, (key, members, int(mtime)))

    def skip(self, seq: int) -> None:
        self.order.put(seq, None)

    def _write(self, item) -> None:
        key, members, mtime = item
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            self.inner.addfile(info, io.BytesIO(data))
        self.written += 1
