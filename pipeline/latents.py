"""Latent files for `pidray decode`: a generator's latent (or a captured x_t) handed to PiD instead of a VAE decoder.

Accepted files (never a pickle):
- `.safetensors`: one tensor (one latent), or several named tensors (a batch: the names are the ids), or one
  4-D tensor [N, C, h, w] with its ids in the metadata (`"ids": JSON list`). Optional metadata: `format`,
  `caption` (all latents) or `captions` (JSON object id -> caption), `sigma` or `sigmas` (JSON object id -> sigma).
- `.npy`: one latent.
- `.npz`: a batch, one named array per latent (the names are the ids); `__caption__`, `__sigma__`, `__format__`
  arrays (strings / a number) apply to every latent in the file.

A latent is [C, h, w] (also [1, C, h, w]; Qwen-Image's video latent [C, 1, h, w] or [1, C, 1, h, w] with one frame)
in the space the generator hands its VAE decoder *before* un-normalising — which is the space PiD's LQ encoders
produce (Flux/Z-Image: scale·(z − shift); SD3 likewise; SDXL: ×0.13025; Flux2: the 128-channel patchified,
batch-norm normalised latent; Qwen-Image: (z − mean)/std). Packed sequence latents (Flux pipelines'
`output_type="latent"`) must be unpacked first (`FluxPipeline._unpack_latents`).

`sigma` marks a captured x_t: the latent is already noised to that level, so PiD conditions on it with
`degrade_sigma = sigma` and adds no noise (the official `from_ldm` path). Flow-matching generators use
x_t = (1 − σ)·x0 + σ·ε as PiD does; SDXL's Euler scheduler keeps x_t = x0 + σ·ε, which is moved to the
variance-preserving frame the SDXL checkpoint was trained in: x / √(σ² + 1), σ / √(σ² + 1).

One module, longer than the others: the three file formats' bounded parsers (safetensors headers, .npz central
directories and their local headers, .npy headers) share the size limits and checks that make a lying file fail
alone, and the planner and the endpoint both parse through them.
"""

from __future__ import annotations

import io
import math
import struct
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from pipeline.errors import BadInput, BadParameter, TooLarge

LATENT_EXTENSIONS = (".safetensors", ".npy", ".npz")
# --format name -> the VAE family whose presets decode it
FORMATS = {"flux": "flux1", "zimage": "flux1", "flux1": "flux1", "sd3": "sd3", "sdxl": "sdxl", "flux2": "flux2",
           "qwenimage": "qwenimage"}  # fmt: skip
MAX_LATENT_ELEMS = 1 << 28  # 1 GiB of fp32: far beyond any 16K output's latent
MAX_LATENT_BYTES = 1 << 30  # all the latents of one file, decompressed (the size limit of a job's input file)
MAX_MEMBERS = 100_000  # latents (named tensors, .npz members) in one file
MAX_HEADER = 16 << 20  # a safetensors header's JSON
MAX_CAPTION_CHARS = 4000  # a caption in a latent file: as long as a prompt may be
READ_CHUNK = 1 << 20  # an array's data is read (inflated) this much at a time, into the array itself


def is_latent_key(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in LATENT_EXTENSIONS


@dataclass
class LatentItem:
    id: str | None
    latent: np.ndarray  # [C, h, w] float32
    caption: str | None = None
    sigma: float | None = None
    format: str | None = None


# ------------------------------------------------------------------------------------------------ reading
# safetensors dtype -> (numpy dtype, bytes per element); a latent must be one of the floating ones
ST_DTYPES = {"F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8", "BOOL": "|b1", "U8": "|u1", "I8": "|i1",
             "F8_E4M3": "|u1", "F8_E5M2": "|u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4",
             "I64": "<i8", "U64": "<u8"}  # fmt: skip
ST_FLOATS = ("F16", "BF16", "F32", "F64")
NPZ_SPECIAL = ("__caption__", "__sigma__", "__format__")


class LatentFile:
    """One latent file, indexed once: its ids from the safetensors header, the .npz's zip directory or the .npy's
    header, and each latent read only when asked (`item`), so the rows of a batch file cost one index plus their own
    latent each. Sizes are checked from the index before anything is allocated or inflated: every latent's elements
    (MAX_LATENT_ELEMS), the bytes all of them take decompressed (`max_bytes`) and how many there are (`max_members`).

    `data` is the file's bytes; an .npz may also be a seekable file object (planning lists its ids from the zip
    directory without reading the members). `index` maps every id to its place in `ids` (a batch file of 100,000
    latents is looked up per row in constant time)."""

    def __init__(self, name: str, data, max_bytes: int = MAX_LATENT_BYTES, max_members: int = MAX_MEMBERS):
        self.name, self.max_bytes, self.max_members = name, max_bytes, max_members
        self.ext = PurePosixPath(name).suffix.lower()
        self.data = data
        self.common: dict = {"caption": None, "sigma": None, "format": None}  # for every latent of the file
        self.captions: dict = {}
        self.sigmas: dict = {}
        if self.ext == ".safetensors":
            self._index_safetensors()
        elif self.ext == ".npy":
            self.ids = [""]
        elif self.ext == ".npz":
            self._index_npz()
        else:
            raise BadInput(f"not a latent file ({', '.join(LATENT_EXTENSIONS)}): {name}")
        self.index = {i: n for n, i in enumerate(self.ids)}

    def item(self, id_: str = "", limit: Callable[[tuple], None] | None = None) -> LatentItem:
        """The latent `id_` ("" when the file holds one latent without an id), validated for shape and values.
        limit: a check of the latent's [C, h, w] shape (`output_limit`), made from the file's header before its data
        is read or inflated, like the shape's own rules."""
        if id_ not in self.index:
            raise BadInput(f"no latent {id_!r} in the file" if id_ else "the file holds several latents: name one")
        what = f"latent {id_!r}" if id_ else "latent"

        def check(shape: tuple) -> None:
            _check_shape(shape, what, limit)

        if self.ext == ".safetensors":
            latent = self._st_array(id_, check)
        elif self.ext == ".npy":
            latent = _load_npy(self.data, check)
        else:
            latent = self._npz_array(id_, check)
        caption = self.captions.get(id_, self.common["caption"])
        sigma = self.sigmas[id_] if id_ in self.sigmas else self.common["sigma"]
        return LatentItem(id_ or None, _as_chw(latent, id_ or None), caption, sigma, self.common["format"])

    # ------------------------------------------------------------------ safetensors
    def _index_safetensors(self) -> None:
        header, n = _st_header(self.data)
        self.entries = _st_entries(header, len(self.data) - 8 - n, self.max_members)
        self.base = 8 + n
        total = sum(e[3] - e[2] for e in self.entries.values())
        if total > self.max_bytes:
            raise TooLarge(f"the file's tensors take {total:,} bytes, over the limit of {self.max_bytes:,}")
        meta = _st_meta(header)
        self.ids = _ids_of(list(self.entries), {k: e[1] for k, e in self.entries.items()}, meta)
        self.captions, self.sigmas = _id_captions(meta, "captions"), _id_sigmas(meta)
        self.common = {"caption": _caption(meta.get("caption"), "caption"), "sigma": _float(meta.get("sigma"), "sigma"),
                       "format": meta.get("format")}  # fmt: skip

    def _st_array(self, id_: str, check=None) -> np.ndarray:
        one = len(self.entries) == 1
        name = next(iter(self.entries)) if one else id_
        dtype, shape, begin, end = self.entries[name]
        what = f"tensor {name!r}"
        if dtype not in ST_FLOATS:
            raise BadInput(f"{what} must be floating point ({', '.join(ST_FLOATS)}), got {dtype}")
        if check is not None:  # from the header, before the data is touched
            check(shape[1:] if one and self.ids != [""] else shape)
        a = np.frombuffer(self.data, ST_DTYPES[dtype], math.prod(shape), self.base + begin).reshape(shape)
        if dtype == "BF16":  # the top half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        if one and self.ids != [""]:  # one [N, C, h, w] tensor with its ids in the metadata
            a = a[self.index[id_]]
        return a

    # ------------------------------------------------------------------ npz
    def _index_npz(self) -> None:
        import zipfile

        f = io.BytesIO(self.data) if isinstance(self.data, (bytes, bytearray, memoryview)) else self.data
        claimed = _zip_entry_count(f)
        if claimed is not None and claimed > self.max_members:  # from the end record, before the directory is parsed
            raise TooLarge(f"the .npz holds {claimed:,} members, over the limit of {self.max_members:,}")
        try:
            self.zip = zipfile.ZipFile(f)  # reads the central directory only
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError):
            raise BadInput("not a readable .npz file (its zip directory is damaged)") from None
        infos = self.zip.infolist()
        if len(infos) > self.max_members:
            raise TooLarge(f"the .npz holds {len(infos):,} members, over the limit of {self.max_members:,}")
        total = sum(i.file_size for i in infos)
        if total > self.max_bytes:
            raise TooLarge(f"the .npz would inflate to {total:,} bytes, over the limit of {self.max_bytes:,}")
        self.members: dict[str, zipfile.ZipInfo] = {}
        for i in infos:
            if i.filename.endswith(".npy"):
                key = i.filename[: -len(".npy")]
                if key in self.members:
                    raise BadInput(f"the .npz holds member {i.filename!r} twice")
                self.members[key] = i
        self.ids = sorted(k for k in self.members if not k.startswith("__"))
        if not self.ids:
            raise BadInput("the .npz holds no latent")

    def npz_common(self) -> None:
        """The .npz's `__caption__`, `__sigma__`, `__format__` arrays (each a single value), read once."""
        caption, sigma, fmt = (self._npz_value(k) for k in NPZ_SPECIAL)
        self.common = {"caption": _caption(caption, "__caption__"), "sigma": _float(sigma, "__sigma__"),
                       "format": None if fmt is None else str(fmt)}  # fmt: skip

    def _npz_value(self, key: str):
        info = self.members.get(key)
        if info is None:
            return None
        if info.file_size > 1 << 20:
            raise TooLarge(f".npz member {info.filename!r} is {info.file_size:,} bytes; it holds one value")
        kinds = "fiu" if key == "__sigma__" else "US"
        a = self._npz_read(info, kinds)
        if a.size != 1:
            raise BadInput(f".npz member {info.filename!r} must hold one value, got {a.size} (shape {list(a.shape)})")
        return a.reshape(()).item()

    def _npz_array(self, id_: str, check=None) -> np.ndarray:
        return self._npz_read(self.members[id_], "f", check)

    def _npz_read(self, info, kinds: str, check=None) -> np.ndarray:
        import zipfile
        import zlib

        what = f".npz member {info.filename!r}"
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # what numpy writes; the others'
            # decompressors cannot be told to stop at a size, so a small stream could inflate past any limit
            raise BadInput(f"{what} is compressed with method {info.compress_type}: an .npz member must be stored or "
                           "deflated (numpy.savez, numpy.savez_compressed)")  # fmt: skip
        _check_local_header(self.zip.fp, info, what)
        try:
            with self.zip.open(info) as f:  # streamed: the array's header is checked before the member inflates
                return _read_array(f, what, info.file_size, kinds, check)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, OSError):
            # zipfile inflates at most the declared size and checks the CRC: a member whose size lies ends here
            raise BadInput(f"{what} is damaged: it does not inflate to the {info.file_size:,} bytes its zip "
                           "directory declares") from None  # fmt: skip


def _zip_entry_count(f) -> int | None:
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


def _check_local_header(fp, info, what: str) -> None:
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


def _st_header(data: bytes) -> tuple[dict, int]:
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


def _st_entries(header: dict, data_size: int | None, max_members: int) -> dict[str, tuple]:
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


def _st_meta(header: dict) -> dict:
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
    header, n = _st_header(head)
    entries = _st_entries(header, None if size is None else size - 8 - n, MAX_MEMBERS)
    return _ids_of(list(entries), {k: e[1] for k, e in entries.items()}, _st_meta(header))


def st_header_bytes(head: bytes) -> int:
    """How many bytes a safetensors file's header takes (its length field plus the JSON)."""
    return 8 + struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 8


def _ids_of(names: list[str], shapes: dict[str, tuple], meta: dict) -> list[str]:
    for k in names:  # ids become manifest keys and file names: text only
        _caption(k, "a tensor name")
    if len(names) > 1:
        return sorted(names)
    if not names:
        raise BadInput("the file holds no tensor")
    shape = list(shapes[names[0]])
    if len(shape) == 4 and shape[0] > 1:
        ids = _meta_json(meta, "ids")
        if ids is None:
            raise BadInput(f"a batch of {shape[0]} latents without ids: give the ids in the metadata (\"ids\": a JSON "
                           "list), or save one named tensor per latent (or one latent per file)")  # fmt: skip
        if not isinstance(ids, list) or len(ids) != shape[0] or not all(isinstance(i, str) and i for i in ids):
            raise BadInput(f"metadata 'ids' must be a list of {shape[0]} non-empty strings")
        if len(set(ids)) != len(ids):
            raise BadInput("metadata 'ids' has duplicates")
        for i in ids:
            _caption(i, "an id in metadata 'ids'")
        return ids
    return [""]


def _meta_json(meta: dict, key: str):
    if key not in meta:
        return None
    from pipeline.safejson import loads

    return loads(meta[key].encode("utf-8", "surrogatepass"), f"metadata {key!r}", MAX_HEADER)


def _id_captions(meta: dict, key: str) -> dict:
    got = _meta_json(meta, key) or {}
    if not isinstance(got, dict) or not all(isinstance(v, str) for v in got.values()):
        raise BadInput(f"metadata {key!r} must be a JSON object of texts (id -> caption)")
    return {k: _caption(v, f"caption of {k!r}") for k, v in got.items()}


def _id_sigmas(meta: dict) -> dict:
    got = _meta_json(meta, "sigmas") or {}
    if not isinstance(got, dict):
        raise BadInput("metadata 'sigmas' must be a JSON object of numbers (id -> sigma)")
    return {k: _float(v, f"sigma of {k!r}") for k, v in got.items()}


def _caption(v, what: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise BadInput(f"{what} must be text, got {type(v).__name__}")
    if len(v) > MAX_CAPTION_CHARS:
        raise BadInput(f"{what} is {len(v):,} characters, over the limit of {MAX_CAPTION_CHARS:,}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid text (it holds a lone UTF-16 surrogate)") from None
    return v


def read_latents(name: str, data: bytes, want: str | None = None) -> list[LatentItem]:
    """The latents of a file — only the one with id `want` when given — validated for shape and values (not yet
    against a preset)."""
    f = open_latents(name, data)
    return [f.item(want)] if want else [f.item(i) for i in f.ids]


def open_latents(name: str, data, max_bytes: int = MAX_LATENT_BYTES, max_members: int = MAX_MEMBERS) -> LatentFile:
    """The file indexed (LatentFile), with an .npz's file-wide values read."""
    f = LatentFile(name, data, max_bytes, max_members)
    if f.ext == ".npz" and isinstance(data, (bytes, bytearray, memoryview)):
        f.npz_common()
    return f


def _read_array(f, what: str, limit: int, kinds: str = "f", check=None) -> np.ndarray:
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


def _chw_shape(shape: tuple) -> tuple | None:
    """The [C, h, w] a latent's shape stands for, by the rules of `_as_chw` (None: none)."""
    s = tuple(shape)
    if len(s) == 5 and s[0] == 1:  # [1, C, T, h, w]
        s = s[1:]
    if len(s) == 4 and s[0] == 1:
        s = s[1:]
    elif len(s) == 4 and s[1] == 1:  # [C, 1, h, w]
        s = (s[0], *s[2:])
    return s if len(s) == 3 else None


def _check_shape(shape: tuple, what: str, limit=None) -> None:
    """A latent's shape from its file's header: one `_as_chw` takes, with no empty dimension, and within `limit`."""
    chw = _chw_shape(shape)
    if chw is None:
        raise BadInput(f"{what} must be [C, h, w] (or [1, C, h, w]), got shape {list(shape)}")
    if min(chw) < 1:
        raise BadInput(f"{what} has an empty dimension: {list(shape)}")
    if limit is not None:
        try:
            limit(chw)
        except TooLarge as e:
            raise TooLarge(f"{what} of shape {list(shape)}: {e}") from None


def output_limit(preset, options, out_size=None) -> Callable[[tuple], None]:
    """A latent's [C, h, w] checked against the output-size limit the encode stage applies to the output it stands
    for (latent × the VAE factor × the preset's scale, then `options.scale`; options.max_output_side), so a latent
    whose output would be refused is refused from its file's header, before its data is read or inflated. With an
    explicit output size (out_size), that size is what the encode stage checks, and this check passes."""
    from pipeline.tiling import check_output_side, target_size

    unit, sr, side = preset.lq_unit, preset.scale, options.max_output_side

    def check(chw: tuple) -> None:
        if out_size:
            return
        in_hw = (chw[1] * unit, chw[2] * unit)
        check_output_side((in_hw[0] * sr, in_hw[1] * sr), side)
        check_output_side(target_size(in_hw, sr, options.scale), side)

    return check


def _load_npy(data: bytes, check=None) -> np.ndarray:
    def first(shape: tuple) -> None:  # from the header
        if len(shape) == 4 and shape[0] > 1:
            raise BadInput(f"a batch of {shape[0]} latents without ids: save an .npz with one named array per latent, "
                           "or one latent per file")  # fmt: skip
        if check is not None:
            check(shape)

    return _read_array(io.BytesIO(data), ".npy file", len(data), check=first)


def npz_ids(data) -> list[str]:
    """The latent ids of an .npz from its zip directory alone (bytes, or a seekable file: nothing else is read)."""
    return LatentFile("x.npz", data).ids


def _float(v, what: str) -> float | None:
    if v is None:
        return None
    try:
        if isinstance(v, bool):
            raise TypeError
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"{what} must be a number, got {str(v)[:40]!r}") from None
    if not math.isfinite(f) or f < 0:
        raise BadInput(f"{what} must be a finite number >= 0, got {str(v)[:40]!r}")
    return f


def _as_chw(a: np.ndarray, id_: str | None) -> np.ndarray:
    what = f"latent {id_!r}" if id_ else "latent"
    if not np.issubdtype(a.dtype, np.floating):
        raise BadInput(f"{what} must be floating point, got {a.dtype}")
    shape = a.shape
    if a.ndim == 5 and a.shape[0] == 1:  # [1, C, T, h, w]
        a = a[0]
    if a.ndim == 4 and a.shape[0] == 1:  # [1, C, h, w]
        a = a[0]
    elif a.ndim == 4 and a.shape[1] == 1:  # a video latent with one frame: [C, 1, h, w]
        a = a[:, 0]
    if a.ndim != 3:
        raise BadInput(f"{what} must be [C, h, w] (or [1, C, h, w]), got shape {list(shape)}")
    if min(a.shape) < 1:
        raise BadInput(f"{what} has an empty dimension: {list(shape)}")
    if a.size > MAX_LATENT_ELEMS:
        raise BadInput(f"{what} has {a.size:,} elements, over the limit of {MAX_LATENT_ELEMS:,}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not a.flags.writeable:  # a view of the file's bytes: the latent is the row's own
        a = a.copy()
    if not np.isfinite(a).all():
        raise BadInput(f"{what} contains NaN or Inf")
    return a


# ------------------------------------------------------------------------------------------------ against a preset
def check_format(fmt: str | None, preset) -> None:
    """A latent format named by the file or the user must be the preset's VAE family."""
    if fmt is None:
        return
    family = FORMATS.get(str(fmt).lower())
    if family is None:
        raise BadParameter(f"unknown latent format {fmt!r}: one of {', '.join(sorted(FORMATS))}")
    if family != preset.vae:
        fits = sorted({n for n, f in FORMATS.items() if f == preset.vae})
        raise BadInput(f"latent format {fmt!r} ({family} VAE) does not fit preset {preset.name!r}, which decodes "
                       f"{preset.vae} latents ({', '.join(fits) or 'none'}); choose a preset for {family}")  # fmt: skip


def check_decodes(preset) -> None:
    """BadParameter unless the preset takes latents in place of its LQ encoder."""
    if not preset.decodes_latents:
        raise BadParameter(
            f"preset {preset.name!r} has no latent decoder ({preset.vae} conditioning): pidray decode "
            "takes a VAE preset (flux-2k, sd3-2k, sdxl-2kto4k, flux2-2k, qwenimage-2kto4k-v1.5, ...)"
        )


def check_latent(latent: np.ndarray, preset) -> None:
    want = preset.latent_channels
    check_decodes(preset)
    if latent.shape[0] != want:
        hint = " (Flux2: the 128-channel patchified, batch-norm normalised latent)" if preset.vae == "flux2" else ""
        raise BadInput(f"latent has {latent.shape[0]} channels; preset {preset.name!r} ({preset.vae}) takes "
                       f"{want}{hint}")  # fmt: skip


def check_sigma(sigma, preset, what: str = "sigma") -> float:
    """A captured x_t's scheduler sigma, checked for the preset: a finite number >= 0, at most 1 for flow-matching
    presets (SDXL's Euler sigma has no upper bound). BadParameter naming `what` (a flag, a field) otherwise."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise BadParameter(f"{what} must be a finite number >= 0, got {sigma!r}")
    if preset.latent_noise != "vp" and sigma > 1.0:
        raise BadParameter(f"{what} {sigma} is outside [0, 1], the flow-matching range of preset {preset.name!r}")
    return float(sigma)


def to_training_frame(latent: np.ndarray, sigma: float | None, preset) -> tuple[np.ndarray, float | None]:
    """A captured x_t moved to the frame the checkpoint was trained in (identity for flow-matching presets)."""
    if sigma is None:
        return latent, None
    sigma = check_sigma(sigma, preset)
    if preset.latent_noise == "vp":  # SDXL: Euler's x0 + σε -> VP sqrt(ᾱ)x0 + sqrt(1-ᾱ)ε
        d = math.sqrt(sigma * sigma + 1.0)
        return (latent / d).astype(np.float32), sigma / d
    return latent, sigma
