"""One latent file, indexed once (`LatentFile`), and the ways in: `open_latents`, `read_latents`, `npz_ids`."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import PurePosixPath

import numpy as np

from pipeline.errors import BadInput, TooLarge
from pipeline.latents.containers import (
    ST_DTYPES,
    ST_FLOATS,
    check_local_header,
    id_captions,
    id_sigmas,
    ids_of,
    load_npy,
    read_array,
    st_entries,
    st_header,
    st_meta,
    zip_entry_count,
)
from pipeline.latents.packed import Packing, unpack, unpacked_chw
from pipeline.latents.values import (
    LATENT_EXTENSIONS,
    MAX_LATENT_BYTES,
    MAX_MEMBERS,
    LatentItem,
    as_chw,
    check_shape,
    number_field,
    text_field,
)

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
        self.image_hw: tuple[int, int] | None = None  # the generated image's size (metadata): lays out packed latents
        if self.ext == ".safetensors":
            self._index_safetensors()
        elif self.ext == ".npy":
            self.ids = [""]
        elif self.ext == ".npz":
            self._index_npz()
        else:
            raise BadInput(f"not a latent file ({', '.join(LATENT_EXTENSIONS)}): {name}")
        self.index = {i: n for n, i in enumerate(self.ids)}

    def item(self, id_: str = "", limit: Callable[[tuple], None] | None = None,
             packing: Packing | None = None) -> LatentItem:  # fmt: skip
        """The latent `id_` ("" when the file holds one latent without an id), validated for shape and values.
        limit: a check of the latent's [C, h, w] shape (`output_limit`), made from the file's header before its data
        is read or inflated, like the shape's own rules. packing: the latent is a packed sequence, unpacked to
        [C, h, w] (its image size from the file's metadata unless the packing names one)."""
        if id_ not in self.index:
            raise BadInput(f"no latent {id_!r} in the file" if id_ else "the file holds several latents: name one")
        what = f"latent {id_!r}" if id_ else "latent"
        if packing is not None and packing.image_hw is None and self.image_hw is not None:
            packing = replace(packing, image_hw=self.image_hw)

        def check(shape: tuple) -> None:
            if packing is not None:
                shape = unpacked_chw(shape, packing)
            check_shape(shape, what, limit)

        if self.ext == ".safetensors":
            latent = self._st_array(id_, check)
        elif self.ext == ".npy":
            latent = load_npy(self.data, check)
        else:
            latent = self._npz_array(id_, check)
        if packing is not None:
            latent = unpack(latent, packing)
        caption = self.captions.get(id_, self.common["caption"])
        sigma = self.sigmas[id_] if id_ in self.sigmas else self.common["sigma"]
        return LatentItem(id_ or None, as_chw(latent, id_ or None), caption, sigma, self.common["format"])

    # ------------------------------------------------------------------ safetensors
    def _index_safetensors(self) -> None:
        header, n = st_header(self.data)
        self.entries = st_entries(header, len(self.data) - 8 - n, self.max_members)
        self.base = 8 + n
        total = sum(e[3] - e[2] for e in self.entries.values())
        if total > self.max_bytes:
            raise TooLarge(f"the file's tensors take {total:,} bytes, over the limit of {self.max_bytes:,}")
        meta = st_meta(header)
        self.ids = ids_of(list(self.entries), {k: e[1] for k, e in self.entries.items()}, meta)
        self.captions, self.sigmas = id_captions(meta, "captions"), id_sigmas(meta)
        self.common = {"caption": text_field(meta.get("caption"), "caption"),
                       "sigma": number_field(meta.get("sigma"), "sigma"), "format": meta.get("format")}  # fmt: skip
        if "height" in meta and "width" in meta:
            hw = (number_field(meta["height"], "height"), number_field(meta["width"], "width"))
            if not all(v >= 1 and v == int(v) for v in hw):
                raise BadInput(f"metadata height and width must be whole numbers >= 1, got {hw}")
            self.image_hw = (int(hw[0]), int(hw[1]))

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
        claimed = zip_entry_count(f)
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
        self.common = {"caption": text_field(caption, "__caption__"), "sigma": number_field(sigma, "__sigma__"),
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
        check_local_header(self.zip.fp, info, what)
        try:
            with self.zip.open(info) as f:  # streamed: the array's header is checked before the member inflates
                return read_array(f, what, info.file_size, kinds, check)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, OSError):
            # zipfile inflates at most the declared size and checks the CRC: a member whose size lies ends here
            raise BadInput(f"{what} is damaged: it does not inflate to the {info.file_size:,} bytes its zip "
                           "directory declares") from None  # fmt: skip


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


def npz_ids(data) -> list[str]:
    """The latent ids of an .npz from its zip directory alone (bytes, or a seekable file: nothing else is read)."""
    return LatentFile("x.npz", data).ids
