"""What the dataset readers and writers share: the limits, a sample as it is read, the ordered spill buffer that lets
results arrive in any order, and the atomic publish of an output shard or table.

A sample is either one to upscale (`image` set) or a failure record (`error` set, with its kind from
`pipeline.errors`): a bad sample never stops its shard. A shard that breaks part-way ends with one record that has
`broken` set: the samples before it were read whole and stand.
"""

from __future__ import annotations

import os
import pickle
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.errors import BadInput, OutputExists, TooLarge, kind_of

# The bulk job refuses an input file over 1 GiB (pipeline.storage's MAX_INPUT_BYTES); one image in a dataset gets the
# same bound, and so do all the members of one sample together (they are held while the sample is assembled).
MAX_MEMBER_BYTES = 1 << 30
MAX_SAMPLE_BYTES = 1 << 30
MAX_MEMBERS = 64  # members of one sample (a WebDataset sample has a handful: image, caption, metadata, ...)
MAX_CAPTION_BYTES = 1 << 16  # a caption is a sentence or a paragraph; the caption encoder keeps a few hundred tokens
MAX_JSON_BYTES = 1 << 20  # a sample's JSON metadata read for its caption
MAX_NAME_BYTES = 4096  # a member's name
MAX_META_BYTES = 1 << 20  # a tar's extended header (pax, GNU long name) is read whole: bounded


@dataclass
class Limits:
    """What one sample may hold. The defaults are the bulk job's; tests and endpoints may set tighter ones."""

    member_bytes: int = MAX_MEMBER_BYTES
    sample_bytes: int = MAX_SAMPLE_BYTES
    members: int = MAX_MEMBERS
    caption_bytes: int = MAX_CAPTION_BYTES


@dataclass
class Sample:
    """One sample of a shard or one row of a table, as read. `id` is what the manifest names it by:
    `shard.tar#key` or `table.parquet#row`."""

    id: str
    key: str  # the sample's key in its shard, or the row number in its table (as text)
    seq: int  # its place in its shard or table, from 0: the order the writer restores
    image: bytes | None = None
    caption: str | None = None
    error: str | None = None  # why this sample cannot be upscaled (shown to users, recorded in the manifest)
    error_kind: str | None = None  # pipeline.errors kind: bad_input, too_large
    broken: bool = False  # the shard or table breaks here: nothing after this record was read
    image_ext: str | None = None  # WebDataset: the image member's extension
    members: list[tuple[str, bytes]] | None = None  # WebDataset: every member (extension, bytes), in shard order
    mtime: int = 0  # WebDataset: the first member's modification time (the output's members keep it)
    path: str | None = None  # Parquet: the image cell's `path` field, when it has one
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict:
        """The sample's manifest fields: its id, the caption used, and for a failure its reason and kind."""
        return {"id": self.id, "caption": self.caption, "status": "ok" if self.ok else "failed", "error": self.error,
                "error_kind": self.error_kind}  # fmt: skip


def failure(id: str, key: str, seq: int, err: BaseException | str, kind: str | None = None, **kw) -> Sample:
    """A failure record for sample `key`: the error's message and kind (BadInput when given a message)."""
    if isinstance(err, str):
        err = BadInput(err)
    return Sample(id=id, key=key, seq=seq, error=str(err), error_kind=kind or kind_of(err), **kw)


def sample_id(name: str, key: str | int) -> str:
    """The manifest's name of a sample: `shard.tar#key`, `table.parquet#row`."""
    return f"{name}#{key}"


def check_caption(text: str | None, what: str, limit: int) -> str | None:
    if text is not None and len(text.encode("utf-8", "surrogatepass")) > limit:
        raise TooLarge(f"{what} is over the caption limit of {limit:,} bytes")
    return text


# ------------------------------------------------------------------------------------ output: order and publish
class Reorder:
    """Items numbered 0, 1, 2, ... given in any order and handed to `emit` in that order. An item given before its
    turn goes to a spill file on local disk (`spill_dir`, else the system's temporary folder) and only its offset is
    held, so memory stays bounded however far ahead results arrive. `None` is an item left out (a failed sample)."""

    def __init__(self, emit: Callable[[object], None], spill_dir: str | None = None):
        self.emit, self.spill_dir = emit, spill_dir
        self.next = 0
        self._waiting: dict[int, tuple[int, int] | None] = {}  # seq -> (offset, length) in the spill, or None
        self._spill = None

    def put(self, seq: int, item) -> None:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < self.next or seq in self._waiting:
            raise ValueError(f"item {seq!r} was given already or is not a place in the order")
        if seq != self.next:
            self._waiting[seq] = None if item is None else self._park(item)
            return
        self._hand_on(item)
        while self.next in self._waiting:
            where = self._waiting.pop(self.next)
            self._hand_on(None if where is None else self._unpark(*where))

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def _hand_on(self, item) -> None:
        if item is not None:
            self.emit(item)
        self.next += 1

    def _park(self, item) -> tuple[int, int]:
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(dir=self.spill_dir, prefix=".pidray-spill-")
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)  # our own file (0600), read back by us only
        self._spill.seek(0, os.SEEK_END)
        offset = self._spill.tell()
        self._spill.write(data)
        return offset, len(data)

    def _unpark(self, offset: int, length: int):
        self._spill.seek(offset)
        return pickle.loads(self._spill.read(length))

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def check_name(name: str, what: str = "output") -> str:
    """A plain file name to publish at: no folder part, nothing hidden, nothing that is not text."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise BadInput(f"unsafe {what} name {name!r}: a shard or table is published under a plain file name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"unsafe {what} name {name!r}: not UTF-8") from None
    return name


class Published:
    """A file written to a temporary name in its destination folder and published whole under its final name by a
    hard link, which fails when anything is at that name: a file this writer did not write is never replaced, and a
    reader never sees a half-written one. A writer that is not closed (an error, a kill) leaves only its temporary
    (`.pidray-<job>-XXXXXXXX.part`, as the job's other temporaries, which a later job of the same id clears)."""

    def __init__(self, folder: str, name: str, tag: str | None = None, replace: bool = False):
        self.folder = os.path.realpath(folder)
        self.name = check_name(name)
        self.replace = replace  # the caller proved the file at the name is its own earlier output: it is replaced
        os.makedirs(self.folder, exist_ok=True)
        if not stat.S_ISDIR(os.lstat(self.folder).st_mode):
            raise BadInput(f"{self.folder!r} is not a folder")
        self.path = os.path.join(self.folder, self.name)
        if not replace and os.path.lexists(self.path):  # said before any work; the link below guarantees it
            raise OutputExists(self.name, f"{self.name!r} already exists in {self.folder}: it is kept (pidray never "
                                          "replaces a file it did not write)")  # fmt: skip
        prefix = f".pidray-{tag}-" if tag and tag.isalnum() else ".pidray-"
        fd, self.tmp = tempfile.mkstemp(dir=self.folder, prefix=prefix, suffix=".part")
        self.file = os.fdopen(fd, "w+b")

    def publish(self) -> str:
        f = self.file
        f.flush()
        os.fsync(f.fileno())
        self.size = os.fstat(f.fileno()).st_size  # what was published (the proof of origin records it)
        f.close()
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        if self.replace and os.path.lexists(self.path):
            os.replace(self.tmp, self.path)  # atomic; a link at the name is replaced, never what it points to
            return self.path
        try:
            os.link(self.tmp, self.path)  # atomic; fails if anything (a file, a link) is at the name
        except FileExistsError:
            self.discard()
            raise OutputExists(self.name, f"{self.name!r} appeared in {self.folder} while it was written: it is "
                                          "kept, and this output is not published")  # fmt: skip
        except BaseException:  # any failure, an interrupt included: the temporary goes, the error is raised
            self.discard()
            raise
        os.unlink(self.tmp)
        return self.path

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class OrderedWriter:
    """What the shard and table writers share: items put by their sequence number are written in input order
    (`Reorder`: those ahead of their turn wait on local disk in `spill_dir`) into a temporary beside the final name
    (`Published`); `close()` publishes it whole, `abort()` (or an error leaving a `with` block) leaves nothing. A
    subclass opens `self.inner`, its format's writer on the temporary (closed before publishing), and writes an item
    in `_write`; `unit` and `whole` name an item and the file in messages. `out`: where it is published instead of
    a local folder (`pipeline.datasets.storage.S3Published`: a temporary on local disk, published as one S3 object)."""

    unit, whole = "item(s)", "file"

    def __init__(self, folder: str | None, name: str, tag: str | None, spill_dir: str | None, replace: bool,
                 out=None):  # fmt: skip
        self.out = out if out is not None else Published(folder, name, tag, replace)
        self.order = Reorder(self._write, spill_dir)
        self.inner = None

    def _write(self, item) -> None:
        raise NotImplementedError

    def close(self) -> str:
        """Publish the file; ValueError when items are still missing (given out of order, never completed)."""
        if self.order.pending:
            self.abort()
            raise ValueError(f"{self.order.pending} {self.unit} of {self.out.name} came after a gap that was never "
                             f"filled: the {self.whole} is not published")  # fmt: skip
        self.inner.close()
        self.order.close()
        return self.out.publish()

    def abort(self) -> None:
        try:
            self.inner.close()  # into the temporary, deleted below (else its buffer is flushed when collected)
        except Exception:  # on the way out: whatever closing raised, the temporary is deleted below
            pass
        self.order.close()
        self.out.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()
