"""Parquet tables: an image column (binary, or a struct of `{bytes, path}` as Hugging Face's `Image` stores it), an
optional caption column (text), and any other columns.

`TableReader` checks a table before anything is read (`check_columns`: the columns are there and of usable types; the
footer and each row group bounded), then streams it as chunks of whole row groups: consecutive tiny row groups are
read together, so a file of thousands of them costs a few reads. Each row becomes a `Sample` (`table.parquet#row`);
a null or empty-struct image, a cell over the input limit or a caption that is too long is a failure record for that
row. `check_same_schema` refuses a folder whose tables do not share one schema, naming the first difference.

`TableWriter` writes the output table with the same schema, the same rows in the same order and every other column
identical: `output_table` replaces a chunk's image column (null for a failed row; a struct's `path` takes the output
format's extension), and the writer takes the chunks in any order (those ahead of their turn wait on local disk),
streams them to a temporary file and publishes it whole and atomically (`common.Published`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.datasets.common import Limits, OrderedWriter, Sample, check_caption, failure, sample_id
from pipeline.errors import BadInput, BadParameter, TooLarge, kind_of

MAX_FOOTER_BYTES = 64 << 20  # a table's metadata; parsed whole when the file is opened
MAX_ROW_GROUP_BYTES = 4 << 30  # a row group is the least that can be read: one over this is refused up front
CHUNK_ROWS = 64  # consecutive row groups are read together until a chunk has this many rows ...
CHUNK_BYTES = 64 << 20  # ... or this many bytes (uncompressed)
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


def _is_binary(t) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_text(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def image_layout(schema: pa.Schema, column: str) -> str:
    """How the image column stores an image: "binary", or "struct" ({bytes, path, ...}); BadInput otherwise."""
    t = schema.field(column).type
    if _is_binary(t):
        return "binary"
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        if "bytes" in names and _is_binary(t.field("bytes").type):
            if "path" not in names or _is_text(t.field("path").type) or pa.types.is_null(t.field("path").type):
                return "struct"
    raise BadInput(f"column {column!r} is {t}: an image column must be binary, or a struct of bytes (binary) and "
                   "path (text), as Hugging Face's Image stores it")  # fmt: skip


def check_columns(schema: pa.Schema, name: str, image_column: str, caption_column: str | None = None,
                  input_is: str = "image") -> str:  # fmt: skip
    """The one-line refusal of a table whose columns cannot be used (before any model loads); the image layout.
    input_is: what the image column holds, for the messages ("image", "latent")."""
    for what, col in ((input_is, image_column), ("caption", caption_column)):
        if col is None and what == "caption":
            continue
        if not isinstance(col, str) or not col:
            raise BadParameter(f"the {what} column must be a column name, got {col!r}")
        count = schema.names.count(col)
        if count == 0:
            raise BadParameter(f"{name} has no column {col!r}; its columns are: {', '.join(schema.names) or 'none'}")
        if count > 1:
            raise BadInput(f"{name} has {count} columns named {col!r}")
    layout = image_layout(schema, image_column)
    if not schema.field(image_column).nullable:
        raise BadInput(f"column {image_column!r} of {name} is declared non-null: a row that fails could not be kept "
                       f"with a null {input_is}")  # fmt: skip
    if caption_column is not None:
        t = schema.field(caption_column).type
        if not (_is_text(t) or pa.types.is_null(t)):
            raise BadInput(f"caption column {caption_column!r} of {name} is {t}, not text")
    return layout


def schema_difference(a: pa.Schema, b: pa.Schema) -> str | None:
    """The first way schema `b` differs from `a` (metadata aside), in words; None when they are the same."""
    if a.equals(b, check_metadata=False):
        return None
    for f in a:
        if f.name not in b.names:
            return f"column {f.name!r} is missing"
        g = b.field(f.name)
        if not f.type.equals(g.type):
            return f"column {f.name!r} is {g.type}, not {f.type}"
        if f.nullable != g.nullable:
            return f"column {f.name!r} is {'nullable' if g.nullable else 'non-null'} here only"
    extra = [n for n in b.names if n not in a.names]
    if extra:
        return f"it has column(s) {', '.join(map(repr, extra))} more"
    return f"its columns are in another order ({', '.join(b.names)})"


def check_same_schema(tables: list[tuple[str, pa.Schema]]) -> None:
    """One table's name and schema after another: BadInput naming the first table whose schema differs from the
    first table's, and how."""
    if not tables:
        return
    first, schema = tables[0]
    for name, other in tables[1:]:
        diff = schema_difference(schema, other)
        if diff:
            raise BadInput(f"the tables do not share one schema: in {name}, {diff} (as in {first})")


def read_footer_length(f) -> int:
    """The length of a Parquet file's footer, read from its last 8 bytes; BadInput when it is not a Parquet file,
    TooLarge when the footer is over MAX_FOOTER_BYTES."""
    size = f.seek(0, os.SEEK_END)
    if size < 12:
        raise BadInput(f"not a Parquet file ({size} bytes)")
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        raise BadInput("not a Parquet file (no PAR1 at its end; an encrypted table is not supported)")
    n = int.from_bytes(tail[:4], "little")
    if n > MAX_FOOTER_BYTES:
        raise TooLarge(f"the table's metadata is {n:,} bytes, over the limit of {MAX_FOOTER_BYTES:,}")
    if n + 12 > size:
        raise BadInput("not a Parquet file (its footer length is past its start)")
    f.seek(0)
    return n


@dataclass
class Chunk:
    """Whole consecutive row groups: their rows (`table`, None where the table broke) and the samples made of them."""

    seq: int
    first_row: int
    table: pa.Table | None
    samples: list[Sample]


class TableReader:
    """One Parquet table (a path or a seekable binary file object), checked at once and then streamed as chunks:
    `for chunk in TableReader(f, "train-0000.parquet", "image", "text").chunks()`."""

    def __init__(self, source, name: str, image_column: str = "image", caption_column: str | None = None,
                 limits: Limits | None = None, max_row_group_bytes: int = MAX_ROW_GROUP_BYTES,
                 chunk_rows: int = CHUNK_ROWS, chunk_bytes: int = CHUNK_BYTES, what: str = "image"):  # fmt: skip
        self.name, self.image_column, self.caption_column, self.what = name, image_column, caption_column, what
        self.limits = limits or Limits()
        self.chunk_rows, self.chunk_bytes = chunk_rows, chunk_bytes
        self._own = isinstance(source, (str, os.PathLike))
        self.file = open(source, "rb") if self._own else source
        try:
            read_footer_length(self.file)
            try:
                self.pf = pq.ParquetFile(self.file)
            except Exception as e:  # ArrowInvalid / OSError with a position: one line
                raise BadInput(f"not a readable Parquet file ({e})") from None
            self.schema = self.pf.schema_arrow
            self.layout = check_columns(self.schema, name, image_column, caption_column, what)
            md = self.pf.metadata
            self.sizes = [(md.row_group(i).num_rows, md.row_group(i).total_byte_size) for i in range(md.num_row_groups)]
            for i, (_, size) in enumerate(self.sizes):
                if size > max_row_group_bytes:
                    raise TooLarge(f"row group {i} of {name} holds {size:,} bytes, over the limit of "
                                   f"{max_row_group_bytes:,}: write the table with smaller row groups")  # fmt: skip
        except BaseException:  # any failure, an interrupt included: the file opened here is closed, the error raised
            self.close()
            raise

    @property
    def num_rows(self) -> int:
        return sum(n for n, _ in self.sizes)

    def plan(self) -> list[list[int]]:
        """The row groups of each chunk: consecutive ones until a chunk reaches `chunk_rows` or `chunk_bytes`."""
        chunks, rows, size = [[]], 0, 0
        for i, (n, b) in enumerate(self.sizes):
            if chunks[-1] and (rows + n > self.chunk_rows or size + b > self.chunk_bytes):
                chunks.append([])
                rows, size = 0, 0
            chunks[-1].append(i)
            rows, size = rows + n, size + b
        return [c for c in chunks if c]

    def chunks(self) -> Iterator[Chunk]:
        first = 0
        for seq, groups in enumerate(self.plan()):
            n = sum(self.sizes[i][0] for i in groups)
            try:
                table = self.pf.read_row_groups(groups, use_threads=False)
                if table.num_rows != n:
                    raise BadInput(f"row groups {groups[0]}..{groups[-1]} hold {table.num_rows} rows, not {n}")
            except Exception as e:  # a damaged row group (pyarrow raises many types): the table ends here, not the job
                msg = f"table broken at row {first} ({type(e).__name__}: {e}); the rows before it are kept"
                yield Chunk(seq, first, None, [failure(sample_id(self.name, first), str(first), first,
                                                       BadInput(msg), broken=True)])  # fmt: skip
                return
            yield Chunk(seq, first, table, self._samples(table, first))
            first += n

    def __iter__(self) -> Iterator[Sample]:
        for chunk in self.chunks():
            yield from chunk.samples

    def _samples(self, table: pa.Table, first: int) -> list[Sample]:
        col = table.column(self.image_column)
        if self.layout == "struct":
            data = pc.struct_field(col, "bytes").to_pylist()
            valid = col.is_valid().to_pylist()
            has_path = "path" in [f.name for f in col.type]
            paths = pc.struct_field(col, "path").to_pylist() if has_path else [None] * len(data)
        else:
            data, valid, paths = col.to_pylist(), [True] * len(col), [None] * len(col)
        captions = table.column(self.caption_column).to_pylist() if self.caption_column else [None] * len(data)
        out = []
        for j, (image, ok, path, caption) in enumerate(zip(data, valid, paths, captions)):
            row = first + j
            sid = sample_id(self.name, row)
            try:
                if not ok or image is None:
                    null = "null" if ok else "null (struct)"
                    raise BadInput(f"no {self.what}: the {self.image_column!r} cell is {null}")
                if len(image) > self.limits.member_bytes:
                    raise TooLarge(f"the {self.what} cell is {len(image):,} bytes, over the limit of "
                                   f"{self.limits.member_bytes:,}")  # fmt: skip
                caption = check_caption(caption, f"the caption of row {row}", self.limits.caption_bytes)
            except BadInput as e:  # a null or oversized cell, an oversized caption: the row fails, the table goes on
                out.append(failure(sid, str(row), row, e, kind_of(e), path=path))
                continue
            out.append(Sample(id=sid, key=str(row), seq=row, image=image, caption=caption, path=path))
        return out

    def close(self) -> None:
        if self._own and not self.file.closed:
            self.file.close()

    def __enter__(self) -> TableReader:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def output_path(path: str | None, ext: str | None) -> str | None:
    """A struct cell's `path` for the output image: its image extension replaced by the output format's."""
    if not path or not ext:
        return path
    stem, dot, old = path.rpartition(".")
    if not dot or "/" in old or f".{old.lower()}" not in _IMAGE_EXTS:
        return path
    return f"{stem}.{ext.lstrip('.')}"


def output_column(col, images: list[bytes | None], extensions: list[str | None] | None = None):
    """An image column (an Arrow array or chunked array, binary or struct) with its bytes replaced by `images`
    (None: null, a failed row). A struct keeps its other fields; its `path` takes the new extension."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    t = col.type
    if len(images) != len(col):
        raise ValueError(f"{len(images)} images for a column of {len(col)} rows")
    if not pa.types.is_struct(t):
        return pa.array(images, type=t)
    extensions = extensions or [None] * len(images)
    children = []
    for f in t:
        if f.name == "bytes":
            children.append(pa.array(images, type=f.type))
        elif f.name == "path" and not pa.types.is_null(f.type):
            paths = pc.struct_field(col, "path").to_pylist()
            children.append(pa.array([output_path(p, e) for p, e in zip(paths, extensions)], type=f.type))
        else:
            children.append(pc.struct_field(col, f.name))
    return pa.StructArray.from_arrays(children, fields=list(t), mask=pa.array([i is None for i in images]))


def output_table(table: pa.Table, image_column: str, images: list[bytes | None],
                 extensions: list[str | None] | None = None) -> pa.Table:  # fmt: skip
    """`table` with its image column replaced (`output_column`); every other column and the schema as they were."""
    i = table.schema.get_field_index(image_column)
    return table.set_column(i, table.schema.field(i), output_column(table.column(i), images, extensions))


class TableWriter(OrderedWriter):
    """An output table at `folder/name` with `schema`: `put(seq, table)` each output chunk (any order; those ahead
    of their turn wait on local disk in `spill_dir`), then `close()` publishes it whole, or `abort()` leaves
    nothing. Each chunk is written as one row group."""

    unit, whole = "chunk(s)", "table"

    def __init__(self, folder: str | None, name: str, schema: pa.Schema, tag: str | None = None,
                 spill_dir: str | None = None, replace: bool = False, out=None):  # fmt: skip
        self.schema = schema
        super().__init__(folder, name, tag, spill_dir, replace, out)
        self.inner = pq.ParquetWriter(self.out.tmp, schema)
        self.rows = 0

    def put(self, seq: int, table: pa.Table) -> None:
        diff = schema_difference(self.schema, table.schema)
        if diff:
            raise ValueError(f"chunk {seq} does not have the table's schema: {diff}")
        self.order.put(seq, table)

    def _write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.inner.write_table(table.replace_schema_metadata(self.schema.metadata), row_group_size=table.num_rows)
            self.rows += table.num_rows
