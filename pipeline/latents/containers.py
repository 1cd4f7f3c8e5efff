"""The bounded parsers of the three latent file formats: safetensors headers, .npz zip directories and their
members' local headers, .npy array headers. Each size is checked against the limits (`pipeline.latents.values`)
before anything is allocated or inflated, so a lying file fails alone; the planner (ids from a header) and the read
(`pipeline.latents.file`) both parse through them."""

from __future__ import annotations

import io
import math
import struct
import tokenize

import numpy as np

from pipeline.errors import BadInput, TooLarge
from pipeline.latents.values import MAX_HEADER, MAX_LATENT_ELEMS, MAX_MEMBERS, READ_CHUNK, number_field, text_field

# safetensors dtype -> (numpy dtype, bytes per element); a latent must be one of the floating ones
ST_DTYPES = {"F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8", "BOOL": "|b1", "U8": "|u1", "I8": "|i1",
             "F8_E4M3": "|u1", "F8_E5M2": "|u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4",
             "I64": "<i8", "U64": "<u8"}  # fmt: skip
ST_FLOATS = ("F16", "BF16", "F32", "F64")


def st_header(data: bytes) -> tuple[dict, int]:
    if len(data) < 8:
        raise BadInput("not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_HEADER:
        raise TooLarge(f"the safetensors header is {n:,} bytes, over the limit of {MAX_HEADER:,}")
    if 8 + n > len(data):
        raise BadInput(f"not a readable safetensors file (its header claims {n:,} bytes; the file holds "
                       f"{len(data) - 8:,} after the length)")  # fmt: skip
    from pipeline.safejson import loads

    header = loads(bytes(data[8 : 8 + n]), "the safetensors header", MAX_HEADER)
    if not isinstance(header, dict):
        raise BadInput("not a readable safetensors file (its header is not a JSON object)")
    return header, n


def st_entries(header: dict, data_size: int | None, max_members: int) -> dict[str, tuple]:
    """name -> (dtype, shape, begin, end) for every tensor of a header, each checked against the spec and the data
    (None: size unknown, only the header read)."""
    names = [k for k in header if k != "__metadata__"]
    if len(names) > max_members:
        raise TooLarge(f"the file holds {len(names):,} tensors, over the limit of {max_members:,}")
    out = {}
    for k in names:
        e = header[k]
        what = f"tensor {k!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise BadInput(f"not a readable safetensors file: the header's entry for {what} must be an object with "
                           "dtype, shape and data_offsets")  # fmt: skip
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise BadInput(f"{what} has an unknown dtype {str(dtype)[:40]!r} (known: {', '.join(ST_DTYPES)})")
        if not _ints(shape, 8):
            raise BadInput(f"{what} has a shape that is not a list of at most 8 integers >= 0: {str(shape)[:80]}")
        if not _ints(offsets, 2) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise BadInput(f"{what} has data_offsets that are not [begin, end]: {str(offsets)[:80]}")
        elems = math.prod(shape)
        if elems > MAX_LATENT_ELEMS:
            raise TooLarge(f"{what} has {elems:,} elements, over the limit of {MAX_LATENT_ELEMS:,}")
        nbytes = elems * np.dtype(ST_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise BadInput(f"{what}: its data_offsets span {offsets[1] - offsets[0]:,} bytes, but a {dtype} tensor of "
                           f"shape {shape} takes {nbytes:,}")  # fmt: skip
        if data_size is not None and offsets[1] > data_size:
            raise BadInput(f"{what}: its data ends at byte {offsets[1]:,}, past the {data_size:,} the file holds")
        out[k] = (dtype, tuple(shape), offsets[0], offsets[1])
    return out


def _ints(v, most: int) -> bool:
    return isinstance(v, list) and len(v) <= most and all(type(x) is int and x >= 0 for x in v)


def st_meta(header: dict) -> dict:
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadInput("the safetensors metadata must be a JSON object of strings (name -> text)")
    return meta


def header_ids(name: str, head: bytes, size: int | None = None) -> list[str] | None:
    """The latent ids of a file from its first bytes when they tell (a safetensors header), else None (read the
    first `8 + header length` bytes and ask again). size: the whole file's, to check tensor offsets against.
    [""] means one latent without an id."""
    if not name.lower().endswith(".safetensors"):
        return None
    if len(head) >= 8:
        (n,) = struct.unpack("<Q", head[:8])
        if n <= MAX_HEADER and 8 + n > len(head) and (size is None or 8 + n <= size):
            return None
    header, n = st_header(head)
    entries = st_entries(header, None if size is None else size - 8 - n, MAX_MEMBERS)
    return ids_of(list(entries), {k: e[1] for k, e in entries.items()}, st_meta(header))


def st_header_bytes(head: bytes) -> int:
    """How many bytes a safetensors file's header takes (its length field plus the JSON)."""
    return 8 + struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 8


def ids_of(names: list[str], shapes: dict[str, tuple], meta: dict) -> list[str]:
    for k in names:  # ids become manifest keys and file names: text only
        text_field(k, "a tensor name")
    if len(names) > 1:
        return sorted(names)
    if not names:
        raise BadInput("the file holds no tensor")
    shape = list(shapes[names[0]])
    ids = _meta_json(meta, "ids")
    if len(shape) == 4 and shape[0] > 1 and (ids is not None or shape[1] != 1):  # [C, 1, h, w]: one frame, no batch
        if ids is None:
            raise BadInput(f"a batch of {shape[0]} latents without ids: give the ids in the metadata (\"ids\": a JSON "
                           "list), or save one named tensor per latent (or one latent per file)")  # fmt: skip
        if not isinstance(ids, list) or len(ids) != shape[0] or not all(isinstance(i, str) and i for i in ids):
            raise BadInput(f"metadata 'ids' must be a list of {shape[0]} non-empty strings")
        if len(set(ids)) != len(ids):
            raise BadInput("metadata 'ids' has duplicates")
        for i in ids:
            text_field(i, "an id in metadata 'ids'")
        return ids
    return [""]


def _meta_json(meta: dict, key: str):
    if key not in meta:
        return None
    from pipeline.safejson import loads

    return loads(meta[key].encode("utf-8", "surrogatepass"), f"metadata {key!r}", MAX_HEADER)


def id_captions(meta: dict, key: str) -> dict:
    got = _meta_json(meta, key) or {}
    if not isinstance(got, dict) or not all(isinstance(v, str) for v in got.values()):
        raise BadInput(f"metadata {key!r} must be a JSON object of texts (id -> caption)")
    return {k: text_field(v, f"caption of {k!r}") for k, v in got.items()}


def id_sigmas(meta: dict) -> dict:
    got = _meta_json(meta, "sigmas") or {}
    if not isinstance(got, dict):
        raise BadInput("metadata 'sigmas' must be a JSON object of numbers (id -> sigma)")
    return {k: number_field(v, f"sigma of {k!r}") for k, v in got.items()}


def zip_entry_count(f) -> int | None:
    """The member count a zip's end record claims (None: a zip64 file, or no end record where expected)."""
    f.seek(0, 2)
    size = f.tell()
    if size < 22:
        return None
    f.seek(size - 22)
    end = f.read(22)
    if end[:4] != b"PK\x05\x06":
        return None
    (count,) = struct.unpack("<H", end[10:12])
    return None if count == 0xFFFF else count


def check_local_header(fp, info, what: str) -> None:
    """A member's local header must agree with the zip directory: its method, and its sizes and CRC, given in the
    header or in the data descriptor after the data (zip64 or not)."""
    if not 0 <= info.header_offset < 1 << 62:  # a directory whose offsets were tampered with
        raise BadInput(f"{what} is damaged: its zip directory places it at offset {info.header_offset}")
    fp.seek(info.header_offset)
    head = fp.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise BadInput(f"{what} is damaged: no local header where the zip directory says it starts")
    flags, method, crc, csize, usize, nlen, elen = struct.unpack("<HHxxxxIIIHH", head[6:30])
    want = (info.CRC, info.compress_size, info.file_size)
    if flags & 0x08:  # the sizes follow the data: crc, then 4- or 8-byte sizes, maybe after a signature
        fp.seek(info.header_offset + 30 + nlen + elen + info.compress_size)
        tail = fp.read(24)
        tail = tail[4:] if tail[:4] == b"PK\x07\x08" else tail
        found = {struct.unpack("<III", tail[:12]) if len(tail) >= 12 else None,
                 struct.unpack("<IQQ", tail[:20]) if len(tail) >= 20 else None}  # fmt: skip
        agrees = want in found
    else:
        agrees = 0xFFFFFFFF in (csize, usize) or (crc, csize, usize) == want  # zip64: the sizes are in its extra
    if method != info.compress_type or not agrees:
        raise BadInput(f"{what} is damaged: its local header and the zip directory disagree about its size")


def read_array(f, what: str, limit: int, kinds: str = "f", check=None) -> np.ndarray:
    """One .npy stream: its header checked (no pickles, an allowed dtype, a size within the limit and within the
    `limit` bytes the stream holds, and `check(shape)` when given) before any data is allocated or inflated; then
    the data read a chunk at a time into the array itself (never more than the header's size, never a second
    copy)."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError
        read_header = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
        shape, fortran, dtype = read_header(f)  # the header only: nothing allocated yet
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, tokenize.TokenError, EOFError):
        # numpy's reasons name its internals (a header that is no dict, cut short, not Python): ours says what the
        # user can act on
        raise BadInput(f"{what} is not a readable .npy array (its header is damaged)") from None
    if dtype.hasobject:
        raise BadInput(f"{what} holds Python objects (a pickle), which pidray never loads")
    if dtype.kind not in kinds or dtype.kind == "b":
        want = "floating point" if kinds == "f" else "a number" if "f" in kinds else "text"
        raise BadInput(f"{what} must be {want}, got {dtype}")
    elems = math.prod(shape)
    if elems > MAX_LATENT_ELEMS:
        raise TooLarge(f"{what} has {elems:,} elements (shape {list(shape)}), over the limit of {MAX_LATENT_ELEMS:,}")
    nbytes = elems * dtype.itemsize
    if nbytes > limit:
        raise BadInput(f"{what} claims {nbytes:,} bytes of data ({dtype}, shape {list(shape)}); it holds at most "
                       f"{limit:,}")  # fmt: skip
    if check is not None:
        check(tuple(shape))
    a = np.empty(elems, dtype)
    view = memoryview(a.view(np.uint8)) if nbytes else memoryview(b"")
    got = 0
    while got < nbytes:
        n = f.readinto(view[got : got + READ_CHUNK])
        if not n:
            break
        got += n
    if got != nbytes:
        raise BadInput(f"{what} is cut short: {got:,} of its {nbytes:,} bytes of data")
    return a.reshape(shape, order="F" if fortran else "C")


def load_npy(data: bytes, check=None) -> np.ndarray:
    def first(shape: tuple) -> None:  # from the header
        if len(shape) == 4 and shape[0] > 1 and shape[1] != 1:  # [C, 1, h, w] is one video latent's frame
            raise BadInput(f"a batch of {shape[0]} latents without ids: save an .npz with one named array per latent, "
                           "or one latent per file")  # fmt: skip
        if check is not None:
            check(shape)

    return read_array(io.BytesIO(data), ".npy file", len(data), check=first)


def latent_extension(data: bytes) -> str | None:
    """What a latent file is from its first bytes, as the extension its readers go by (".npy", ".npz",
    ".safetensors": a header length then its JSON), or None for none of them."""
    if data[:6] == b"\x93NUMPY":
        return ".npy"
    if data[:4] == b"PK\x03\x04":
        return ".npz"
    if len(data) > 9 and data[8:9] == b"{":
        return ".safetensors"
    return None
