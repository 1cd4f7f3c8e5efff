"""WebDataset shards and Parquet tables in and out (pipeline.datasets): real shards and tables made from the bundled
sample photos, the writers' round trip (also through Ray Data's own readers), and the attacks: unsafe member names,
links and devices, repeated members, lying size headers, truncated and non-tar files, a flood of members; Parquet
tables with missing or mistyped columns, null structs, an oversized cell, thousands of row groups, schemas that
change between files."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.datasets import Limits, ShardReader, ShardWriter, TableReader, TableWriter, output_members
from pipeline.datasets.common import Reorder
from pipeline.datasets.parquet import check_same_schema, output_table
from pipeline.errors import BadInput, BadParameter, OutputExists, TooLarge

SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "samples"


def _photos() -> dict[str, bytes]:
    gray = io.BytesIO()
    Image.open(SAMPLES / "astronaut.png").convert("L").save(gray, "PNG")
    coffee = (SAMPLES / "coffee.jpg").read_bytes()
    return {"coffee": coffee, "chelsea": (SAMPLES / "chelsea.png").read_bytes(), "gray": gray.getvalue(),
            "broken": coffee[: len(coffee) // 2]}  # fmt: skip


PHOTOS = _photos()


def make_tar(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    """A tar of (name, bytes) members, or (TarInfo, bytes) for members of other types."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if info.type in tarfile.REGULAR_TYPES:
                info.size = len(data)
            info.mtime = 1_700_000_000
            t.addfile(info, io.BytesIO(data) if info.type in tarfile.REGULAR_TYPES else None)
    return buf.getvalue()


def header_offsets(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: m.offset for m in t.getmembers()}


def patch_size(data: bytes, offset: int, size: int) -> bytes:
    """The tar with the size field of the header at `offset` set to `size` and its checksum made right again."""
    h = bytearray(data[offset : offset + 512])
    h[124:136] = b"%011o\0" % size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return data[:offset] + bytes(h) + data[offset + 512 :]


def real_shard() -> tuple[bytes, list[tuple[str, bytes]]]:
    meta = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    members = [
        ("coffee.jpg", PHOTOS["coffee"]), ("coffee.txt", b"a cup of coffee\n"),
        ("coffee.json", meta(w=96, caption="cup")),
        ("chelsea.png", PHOTOS["chelsea"]), ("chelsea.json", meta(caption="a cat", src="skimage")),
        ("sub/dir/gray.cls", b"3"), ("sub/dir/gray.png", PHOTOS["gray"]), ("sub/dir/gray.txt", b"an astronaut"),
        ("broken.jpg", PHOTOS["broken"]), ("broken.txt", b"half a file"),
        ("noimage.txt", b"no picture here"), ("noimage.json", meta(caption="nothing")),
    ]  # fmt: skip
    return make_tar(members), members


# ------------------------------------------------------------------------------------ WebDataset: reading
def test_a_real_shard_reads_as_its_samples_with_captions():
    data, members = real_shard()
    samples = list(ShardReader(io.BytesIO(data), "00000.tar"))
    assert [s.id for s in samples] == ["00000.tar#" + k for k in ("coffee", "chelsea", "sub/dir/gray", "broken",
                                                                     "noimage")]  # fmt: skip
    assert [s.seq for s in samples] == [0, 1, 2, 3, 4]
    coffee, chelsea, gray, broken, noimage = samples
    assert coffee.ok and coffee.image == PHOTOS["coffee"] and coffee.image_ext == "jpg"
    assert coffee.caption == "a cup of coffee" and chelsea.caption is None  # txt by default; chelsea has none
    assert [e for e, _ in coffee.members] == ["jpg", "txt", "json"]
    assert gray.image_ext == "png" and [e for e, _ in gray.members] == ["cls", "png", "txt"] and gray.mtime > 0
    assert broken.ok  # a broken image is the decode stage's to find: the reader hands its bytes on
    assert not noimage.ok and noimage.error_kind == "bad_input" and "no image member" in noimage.error
    assert "txt, json" in noimage.error and noimage.record()["status"] == "failed"
    by_json = list(ShardReader(io.BytesIO(data), "00000.tar", caption_key="json:caption"))
    assert [s.caption for s in by_json[:3]] == ["cup", "a cat", None]
    only_png = list(ShardReader(io.BytesIO(data), "00000.tar", image_key="png", caption_key=None))
    assert [s.ok for s in only_png] == [False, True, True, False, False] and only_png[1].caption is None
    gz = list(ShardReader(io.BytesIO(gzip.compress(data)), "00000.tar"))
    assert [(s.id, s.image) for s in gz] == [(s.id, s.image) for s in samples]


def test_caption_problems_fail_their_sample_only():
    data = make_tar([("a.jpg", b"1"), ("a.txt", b"\xff\xfe"), ("b.jpg", b"2"), ("b.json", b'{"c": 3}'),
                     ("c.jpg", b"3"), ("c.json", b"[[[["), ("d.jpg", b"4"), ("d.txt", b"x" * 300),
                     ("e.jpg", b"5"), ("e.json", b'{"c": {"d": "deep"}}')])  # fmt: skip
    small = Limits(caption_bytes=100)
    got = {s.key: s for s in ShardReader(io.BytesIO(data), "s.tar", caption_key="json:c", limits=small)}
    assert got["a"].ok and got["a"].caption is None  # json:c reads the json member only
    assert "is int, not text" in got["b"].error and "not JSON" in got["c"].error
    txt = {s.key: s for s in ShardReader(io.BytesIO(data), "s.tar", limits=Limits(caption_bytes=100))}
    assert "not UTF-8" in txt["a"].error and txt["d"].error_kind == "too_large" and txt["b"].ok
    nested = {s.key: s for s in ShardReader(io.BytesIO(data), "s.tar", caption_key="json:c.d")}
    assert nested["e"].caption == "deep" and nested["b"].caption is None
    for bad in ("", ":", "json:", "json:a..b", 3):
        with pytest.raises(BadParameter):
            ShardReader(io.BytesIO(data), "s.tar", caption_key=bad)


# ------------------------------------------------------------------------------------ WebDataset: writing
def _write_shard(folder, name, samples, order=reversed):
    with ShardWriter(str(folder), name) as w:
        for s in order(samples):
            if s.ok:
                w.put(s.seq, s.key, output_members(s, b"UPSCALED-" + s.key.encode(), ".png"), s.mtime)
            else:
                w.skip(s.seq)
        return w.close()


def test_the_output_shard_keeps_order_and_members_byte_for_byte(tmp_path):
    data, members = real_shard()
    samples = list(ShardReader(io.BytesIO(data), "00000.tar"))
    path = _write_shard(tmp_path, "00000.tar", samples)  # given in reverse: assembled in input order
    assert os.listdir(tmp_path) == ["00000.tar"]  # no temporary, no spill left
    with tarfile.open(path) as t:
        out = [(m.name, t.extractfile(m).read()) for m in t]
    kept = [(n, d) for n, d in members if not n.startswith("noimage")]
    stem = lambda n: n.rsplit(".", 1)[0]  # noqa: E731
    expect = [(stem(n) + ".png", b"UPSCALED-" + stem(n).encode()) if n.endswith((".jpg", ".png")) else (n, d)
              for n, d in kept]  # fmt: skip
    assert out == expect
    again = list(ShardReader(open(path, "rb"), "00000.tar"))
    assert [s.key for s in again] == ["coffee", "chelsea", "sub/dir/gray", "broken"]
    assert [s.caption for s in again] == [s.caption for s in samples[:4]]


def test_the_writer_never_replaces_a_file_and_leaves_nothing_when_aborted(tmp_path):
    data, _ = real_shard()
    samples = list(ShardReader(io.BytesIO(data), "s.tar"))
    (tmp_path / "s.tar").write_bytes(b"theirs")
    with pytest.raises(OutputExists):
        _write_shard(tmp_path, "s.tar", samples)
    w = ShardWriter(str(tmp_path), "t.tar")
    w.put(0, "a", [("jpg", b"1")])
    (tmp_path / "t.tar").write_bytes(b"appeared meanwhile")
    with pytest.raises(OutputExists):
        w.close()
    assert (tmp_path / "t.tar").read_bytes() == b"appeared meanwhile" and (tmp_path / "s.tar").read_bytes() == b"theirs"
    w = ShardWriter(str(tmp_path), "u.tar")
    w.put(1, "b", [("jpg", b"2")])  # sample 0 never comes
    with pytest.raises(ValueError, match="never"):
        w.close()
    with pytest.raises(ValueError):
        with ShardWriter(str(tmp_path), "v.tar") as w:
            w.put(0, "a", [("jpg", b"1")])
            raise ValueError("the job stops")
    assert sorted(os.listdir(tmp_path)) == ["s.tar", "t.tar"]
    for name in ("../x.tar", "/etc/x.tar", "a/b.tar", ".hidden", ""):
        with pytest.raises(BadInput):
            ShardWriter(str(tmp_path), name)
    with ShardWriter(str(tmp_path), "w.tar") as w:
        for key in ("../x", "/etc/x", "a.b", "a//b"):
            with pytest.raises(BadInput):
                w.put(0, key, [("jpg", b"1")])
        w.abort()
    assert sorted(os.listdir(tmp_path)) == ["s.tar", "t.tar"]
    with pytest.raises(BadInput, match="repeat"):
        output_members(samples[1], b"x", "json")  # chelsea has a json member already


def test_reorder_spills_what_comes_early_to_disk(tmp_path):
    got = []
    r = Reorder(got.append, spill_dir=str(tmp_path))
    for seq in (3, 1, 4, 2):
        r.put(seq, None if seq == 4 else b"x" * 1000 + bytes([seq]))
    assert got == [] and r.pending == 4 and r._spill is not None
    r.put(0, b"first")
    assert [g[-1:] for g in got] == [b"t", b"\x01", b"\x02", b"\x03"] and r.pending == 0 and r.next == 5
    with pytest.raises(ValueError):
        r.put(2, b"again")
    r.close()


# ------------------------------------------------------------------------------------ WebDataset: attacks
def _records(data: bytes, **kw):
    return list(ShardReader(io.BytesIO(data), "evil.tar", **kw))


def _info(name, type_, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return info


@pytest.mark.parametrize(
    "member, reason",
    [
        (("../x.jpg", b"1"), "unsafe name"),
        (("/etc/x.jpg", b"1"), "absolute name"),
        (("a/../../x.jpg", b"1"), "unsafe name"),
        ((_info("x.jpg", tarfile.SYMTYPE, "/etc/passwd"), b""), "symbolic link"),
        ((_info("x.jpg", tarfile.LNKTYPE, "good.jpg"), b""), "hard link"),
        ((_info("x.jpg", tarfile.CHRTYPE), b""), "character device"),
        ((_info("x.jpg", tarfile.FIFOTYPE), b""), "FIFO"),
        ((_info("x.jpg", b"Z"), b"data"), "tar type"),
        (("noext", b"1"), "names no sample"),
        ((".x.jpg", b"1"), "names no sample"),
    ],
)
def test_a_bad_member_fails_its_sample_and_the_shard_goes_on(member, reason):
    data = make_tar([("good.jpg", b"G"), member, ("after.jpg", b"A"), ("after.txt", b"cap")], fmt=tarfile.GNU_FORMAT)
    recs = _records(data)
    assert [r.ok for r in recs] == [True, False, True], [(r.id, r.error) for r in recs]
    assert reason in recs[1].error and not recs[1].broken and recs[1].members is None
    assert recs[2].image == b"A" and recs[2].caption == "cap"


def test_repeated_members_and_keys():
    recs = _records(make_tar([("a.jpg", b"1"), ("a.jpg", b"2"), ("b.jpg", b"3"), ("a.txt", b"late"), ("c.jpg", b"4")]))
    assert [(r.key, r.ok) for r in recs] == [("a", False), ("b", True), ("a", False), ("c", True)]
    assert "repeated" in recs[0].error and "comes back" in recs[2].error


def test_limits_on_members_and_samples():
    many = [("big.jpg", b"1")] + [(f"big.x{i}", b"") for i in range(5000)] + [("next.jpg", b"2")]
    recs = _records(make_tar(many), limits=Limits(members=64))
    assert [r.ok for r in recs] == [False, True] and "more than 64 members" in recs[0].error
    shard = make_tar([("a.jpg", b"x" * 2000), ("b.jpg", b"y" * 10), ("c.jpg", b"1" * 600), ("c.txt", b"2" * 600)])
    recs = _records(shard, limits=Limits(member_bytes=1000, sample_bytes=1000))
    assert [r.error_kind for r in recs] == ["too_large", None, "too_large"]
    assert "over the limit of 1,000" in recs[0].error and "together" in recs[2].error


def test_a_flood_of_empty_members_costs_bounded_memory():
    """8,000 empty members, each its own sample (no image): one record each, streamed; memory flat (tarfile alone
    would keep every header it read)."""
    data = make_tar([(f"k{i:05d}.cls", b"") for i in range(8_000)] + [("last.jpg", b"L")])
    tracemalloc.start()
    t0 = time.perf_counter()
    n = failed = 0
    for r in ShardReader(io.BytesIO(data), "flood.tar"):
        n += 1
        failed += not r.ok
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (n, failed) == (8_001, 8_000)
    assert peak < 2 << 20, f"peak {peak:,} bytes"  # the key hashes and one sample, not 8,000 headers
    print(f"flood: {n:,} records in {seconds:.2f} s, peak {peak / 1e6:.1f} MB traced")


def _broken(recs, kept: list[str]):
    assert [r.key for r in recs[:-1]] == kept and all(r.ok for r in recs[:-1])
    last = recs[-1]
    assert last.broken and not last.ok and "the samples before it are kept" in last.error
    return last


def test_a_size_header_that_lies_breaks_the_shard_where_it_lies():
    data = make_tar([("a.jpg", b"1" * 700), ("b.jpg", b"2" * 700), ("b.txt", b"two"), ("c.jpg", b"3" * 700)])
    at = header_offsets(data)
    longer = _records(patch_size(data, at["b.txt"], 50_000))  # swallows c's header, runs past the end
    _broken(longer, ["a"])
    shorter = _records(patch_size(data, at["b.jpg"], 100))  # the next header lands inside b.jpg's data
    assert "bad tar header" in _broken(shorter, ["a"]).error
    # a size that points into a block of zeros: tarfile would take it for the end and drop c silently
    zeros = make_tar([("a.jpg", b"1" * 700), ("b.jpg", b"\0" * 3000), ("c.jpg", b"3" * 700)])
    recs = _records(patch_size(zeros, header_offsets(zeros)["b.jpg"], 10))
    last = _broken(recs, ["a"])  # b, the sample being read when the shard broke, is named by its record
    assert "after the tar's end" in last.error and last.id == "evil.tar#b"
    negative = bytearray(data)
    h = at["b.jpg"]
    negative[h + 124 : h + 136] = b"\xff" * 12
    negative[h + 148 : h + 156] = b" " * 8
    negative[h + 148 : h + 156] = b"%06o\0 " % sum(negative[h : h + 512])
    _broken(_records(bytes(negative)), [])


def test_a_truncated_shard_keeps_every_whole_sample_before_the_cut():
    data, _ = real_shard()
    whole = [s.key for s in _records(data)]
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        end = max(m.offset_data + m.size for m in t.getmembers())  # then the end-of-archive blocks and padding
    for cut in range(512, end, 997):
        recs = _records(data[:cut])
        assert recs[-1].broken, cut
        assert [r.key for r in recs[:-1]] == whole[: len(recs) - 1], cut
        for r, s in zip(recs[:-1], _records(data)):
            assert (r.image, r.members) == (s.image, s.members)
    no_end = data[: header_offsets(data)["noimage.txt"]]  # cut exactly between two members
    assert "without its end-of-archive" in _broken(_records(no_end), whole[:3]).error


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100, PHOTOS["chelsea"], gzip.compress(b"x" * 5000),
                                     b"\x1f\x8b" + b"\0" * 600, b"\0" * 10240])  # fmt: skip
def test_a_file_that_is_not_a_tar_is_one_record(content):
    recs = _records(content)
    if content == b"\0" * 10240:  # an empty archive: no samples, nothing broken
        assert recs == []
        return
    assert len(recs) == 1 and recs[0].broken and recs[0].id == "evil.tar", recs


def test_extended_headers_are_bounded():
    long_name = "d/" + "n" * 300 + ".jpg"  # a pax header for the long name
    data = make_tar([("a.jpg", b"1"), (long_name, b"2"), ("c.jpg", b"3")], fmt=tarfile.PAX_FORMAT)
    assert [r.ok for r in _records(data)] == [True, True, True]
    pax_at = header_offsets(make_tar([("a.jpg", b"1")], fmt=tarfile.USTAR_FORMAT))["a.jpg"] + 1024
    huge = patch_size(data, pax_at, 1 << 32)  # the pax header of the long name claims 4 GiB
    last = _broken(_records(huge), [])
    assert "extended tar header" in last.error and last.id == "evil.tar#a"


# ------------------------------------------------------------------------------------ Parquet
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def real_table(row_group_size=2) -> pa.Table:
    cells = [{"bytes": PHOTOS["coffee"], "path": "coffee.jpg"}, {"bytes": PHOTOS["chelsea"], "path": "cat.png"},
             {"bytes": PHOTOS["gray"], "path": None}, {"bytes": PHOTOS["broken"], "path": "broken.jpg"}, None,
             {"bytes": None, "path": "nothing.png"}]  # fmt: skip
    schema = pa.schema([("id", pa.int64()), ("image", IMAGE), ("text", pa.string()), ("tags", pa.list_(pa.string())),
                        ("meta", pa.struct([("w", pa.int32()), ("src", pa.string())]))],
                       metadata={b"huggingface": b'{"info": {"features": {}}}'})  # fmt: skip
    return pa.table({"id": range(6), "image": pa.array(cells, IMAGE),
                     "text": ["coffee", "a cat", None, "half", "x", "y"],
                     "tags": [["a"], [], None, ["b", "c"], ["d"], []],
                     "meta": [{"w": i, "src": "skimage"} for i in range(6)]}, schema=schema)  # fmt: skip


def _upscale_table(reader: TableReader, folder, order=reversed) -> str:
    chunks = list(reader.chunks())
    with TableWriter(str(folder), reader.name, reader.schema) as w:
        for c in order(chunks):
            images = [b"OUT" + s.key.encode() if s.ok else None for s in c.samples]
            w.put(c.seq, output_table(c.table, reader.image_column, images, [".png"] * len(images)))
        return w.close()


def test_a_real_table_streams_its_rows_and_writes_them_back(tmp_path):
    table = real_table()
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)
    reader = TableReader(str(tmp_path / "train.parquet"), "train.parquet", "image", "text")
    samples = list(reader)
    assert [s.id for s in samples] == [f"train.parquet#{i}" for i in range(6)]
    assert [s.ok for s in samples] == [True, True, True, True, False, False]
    assert samples[0].image == PHOTOS["coffee"] and samples[0].caption == "coffee" and samples[2].caption is None
    assert samples[1].path == "cat.png" and "null" in samples[4].error and "null" in samples[5].error
    path = _upscale_table(reader, tmp_path / "out")
    out, table = pq.read_table(path), pq.read_table(tmp_path / "train.parquet")
    assert out.schema.equals(table.schema, check_metadata=True)
    assert out.drop_columns(["image"]).equals(table.drop_columns(["image"]))  # same rows, same order, same values
    cells = out.column("image").to_pylist()
    assert cells[:4] == [{"bytes": b"OUT0", "path": "coffee.png"}, {"bytes": b"OUT1", "path": "cat.png"},
                         {"bytes": b"OUT2", "path": None}, {"bytes": b"OUT3", "path": "broken.png"}]  # fmt: skip
    assert cells[4:] == [None, None]
    assert sorted(os.listdir(tmp_path / "out")) == ["train.parquet"]
    with pytest.raises(OutputExists):
        _upscale_table(TableReader(str(tmp_path / "train.parquet"), "train.parquet"), tmp_path / "out")
    assert pq.read_table(path).equals(out)


def test_a_binary_image_column_and_an_oversized_cell(tmp_path):
    t = pa.table({"img": pa.array([PHOTOS["coffee"], b"x" * 5000, None], pa.binary()), "n": [1, 2, 3]})
    pq.write_table(t, tmp_path / "b.parquet")
    reader = TableReader(str(tmp_path / "b.parquet"), "b.parquet", "img", limits=Limits(member_bytes=4950))
    samples = list(reader)
    assert samples[0].ok and samples[1].error_kind == "too_large" and "5,000 bytes" in samples[1].error
    out = pq.read_table(_upscale_table(reader, tmp_path / "out"))
    assert out.column("img").to_pylist() == [b"OUT0", None, None] and out.column("n").to_pylist() == [1, 2, 3]


def test_thousands_of_tiny_row_groups_are_read_a_chunk_at_a_time(tmp_path):
    t = pa.table({"image": pa.array([PHOTOS["chelsea"][:100]] * 3000, pa.binary()), "i": range(3000)})
    pq.write_table(t, tmp_path / "tiny.parquet", row_group_size=1)
    reader = TableReader(str(tmp_path / "tiny.parquet"), "tiny.parquet")
    assert reader.pf.metadata.num_row_groups == 3000 and len(reader.plan()) == 3000 // 64 + 1
    t0 = time.perf_counter()
    out = pq.read_table(_upscale_table(reader, tmp_path / "out", order=lambda c: c))
    assert out.column("i").to_pylist() == list(range(3000))
    assert pq.ParquetFile(tmp_path / "out/tiny.parquet").num_row_groups == 47
    print(f"3,000 row groups read and written in {time.perf_counter() - t0:.2f} s")


@pytest.mark.parametrize(
    "column, error",
    [
        (pa.array([1, 2]), "int64: an image column must be binary"),
        (pa.array([[b"a"], [b"b"]], pa.list_(pa.binary())), "list<"),
        (pa.array([{"data": b"a"}, None], pa.struct([("data", pa.binary())])), "struct<data: binary>"),
        (pa.array([{"bytes": {"b": b"a"}}, None], pa.struct([("bytes", pa.struct([("b", pa.binary())]))])), "struct"),
        (pa.array([{"bytes": b"a", "path": 3}, None], pa.struct([("bytes", pa.binary()), ("path", pa.int8())])),
         "struct"),
        (pa.array(["text", "s"]), "string"),
    ],
)  # fmt: skip
def test_an_image_column_of_the_wrong_type_is_refused_up_front(tmp_path, column, error):
    pq.write_table(pa.table({"image": column, "text": ["a", "b"]}), tmp_path / "w.parquet")
    with pytest.raises(BadInput, match="an image column must be binary") as e:
        TableReader(str(tmp_path / "w.parquet"), "w.parquet")
    assert error in str(e.value) and "\n" not in str(e.value)


def test_columns_missing_or_mistyped_and_files_that_are_not_tables(tmp_path):
    pq.write_table(real_table(), tmp_path / "t.parquet")
    with pytest.raises(BadParameter) as e:
        TableReader(str(tmp_path / "t.parquet"), "t.parquet", "picture")
    assert str(e.value) == "t.parquet has no column 'picture'; its columns are: id, image, text, tags, meta"
    with pytest.raises(BadParameter, match="no column 'caption'"):
        TableReader(str(tmp_path / "t.parquet"), "t.parquet", "image", "caption")
    with pytest.raises(BadInput, match="caption column 'id' of t.parquet is int64, not text"):
        TableReader(str(tmp_path / "t.parquet"), "t.parquet", "image", "id")
    strict = pa.schema([pa.field("image", pa.binary(), nullable=False)])
    pq.write_table(pa.table({"image": [b"a"]}, schema=strict), tmp_path / "strict.parquet")
    with pytest.raises(BadInput, match="declared non-null"):
        TableReader(str(tmp_path / "strict.parquet"), "strict.parquet")
    good = (tmp_path / "t.parquet").read_bytes()
    for name, content, match in [("tar.parquet", real_shard()[0], "no PAR1"), ("short.parquet", b"PAR1", "4 bytes"),
                                 ("cut.parquet", good[: len(good) // 2], "no PAR1"),
                                 ("lying.parquet", b"PAR1" + b"\0" * 20 + (10**6).to_bytes(4, "little") + b"PAR1",
                                  "past its start"),
                                 ("huge.parquet", b"PAR1" + (1 << 31).to_bytes(4, "little") + b"PAR1",
                                  "over the limit"),
                                 ("garbage.parquet", b"PAR1" + b"\x07" * 100 + (100).to_bytes(4, "little") + b"PAR1",
                                  "not a readable")]:  # fmt: skip
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BadInput, match=match):
            TableReader(str(tmp_path / name), name)
    with pytest.raises(TooLarge, match="row group 0 of t.parquet holds"):
        TableReader(str(tmp_path / "t.parquet"), "t.parquet", max_row_group_bytes=1000)


def test_a_schema_that_changes_between_files_is_refused():
    a = real_table().schema
    check_same_schema([("a.parquet", a), ("b.parquet", a.with_metadata({}))])  # metadata aside: the same
    for other, said in [(a.remove(3), "column 'tags' is missing"),
                        (a.set(2, pa.field("text", pa.large_string())), "column 'text' is large_string, not string"),
                        (a.append(pa.field("extra", pa.int8())), "'extra' more"),
                        (pa.schema([a.field(1), a.field(0), *a][:2] + list(a)[2:]), "another order")]:  # fmt: skip
        with pytest.raises(BadInput) as e:
            check_same_schema([("a.parquet", a), ("a.parquet", a), ("c.parquet", other)])
        assert str(e.value).startswith("the tables do not share one schema: in c.parquet, ") and said in str(e.value)


def test_a_broken_row_group_ends_the_table_with_the_rows_before_it(tmp_path):
    table = real_table()
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2, compression="none")
    data = bytearray((tmp_path / "t.parquet").read_bytes())
    md = pq.ParquetFile(tmp_path / "t.parquet").metadata
    rg = md.row_group(2).column(1)  # the image column of the last row group
    start = rg.data_page_offset
    data[start : start + rg.total_compressed_size] = b"\xff" * rg.total_compressed_size
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    reader = TableReader(str(tmp_path / "bad.parquet"), "bad.parquet", chunk_rows=2)
    chunks = list(reader.chunks())
    assert [c.table is not None for c in chunks] == [True, True, False]
    last = chunks[-1].samples[0]
    assert last.broken and last.id == "bad.parquet#4" and "the rows before it are kept" in last.error


# ------------------------------------------------------------------------------------ Ray Data reads what we write
@pytest.mark.slow
def test_ray_data_reads_the_output_shards_and_tables(ray_local, tmp_path):
    data, members = real_shard()
    samples = list(ShardReader(io.BytesIO(data), "00000.tar", caption_key="json:caption"))
    _write_shard(tmp_path / "wds", "00000.tar", samples)
    rows = ray_local.data.read_webdataset(str(tmp_path / "wds"), decoder=None).take_all()
    assert [r["__key__"] for r in rows] == ["coffee", "chelsea", "sub/dir/gray", "broken"]
    given = dict(members)
    for r in rows:
        assert r["png"] == b"UPSCALED-" + r["__key__"].encode() and "jpg" not in r
        for ext in ("txt", "json", "cls"):
            if f"{r['__key__']}.{ext}" in given:
                assert r[ext] == given[f"{r['__key__']}.{ext}"], (r["__key__"], ext)
    pq.write_table(real_table(), tmp_path / "train.parquet", row_group_size=2)
    _upscale_table(TableReader(str(tmp_path / "train.parquet"), "train.parquet", "image", "text"), tmp_path / "pq")
    back = ray_local.data.read_parquet(str(tmp_path / "pq")).take_all()
    assert [r["id"] for r in back] == list(range(6)) and back[0]["image"]["bytes"] == b"OUT0"
    assert back[4]["image"] is None and back[3]["meta"] == {"w": 3, "src": "skimage"}
