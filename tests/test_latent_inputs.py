"""Latent files that lie (zip bombs, sizes, headers), batch files read once, and messages that speak to users: the
decode workflow's input path, tested on its stages directly (no model, no Ray)."""

import io
import json
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from pipeline.errors import BadInput, TooLarge
from pipeline.latents import read_latents
from pipeline.model.presets import get_preset
from pipeline.runtime import ModelOptions
from pipeline.stages import run_stage
from pipeline.stages.io import ReadStage
from pipeline.stages.latent import LatentStage
from pipeline.storage import LocalLocation, Location
from pipeline.workflow import resolve_workflow

ENTER = resolve_workflow("decode", ModelOptions("flux-2k")).enter  # rows come in through their workflow
# what a message must never hold: Python's own words for a failure, or a trace
PYTHON_SPEAK = re.compile(r"object has no attribute|unhashable|not iterable|can't multiply|can only convert|"
                          r"Error\b|Traceback|NoneType|<class|TextEncodeInput|\^\[")  # fmt: skip


def _npz(arrays: dict, compressed: bool = True) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _zip(members: dict) -> bytes:
    """An .npz written member by member (sizes in each local header, no data descriptor)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, a in members.items():
            npy = io.BytesIO()
            np.save(npy, a)
            z.writestr(f"{name}.npy", npy.getvalue())
    return buf.getvalue()


def _lie(data: bytes, member: int, size: int, local: bool = True, central: bool = True) -> bytes:
    """The zip with member number `member`'s uncompressed size set to `size` in its local header and/or the
    central directory (the data itself unchanged)."""
    b = bytearray(data)
    z = zipfile.ZipFile(io.BytesIO(data))
    info = z.infolist()[member]
    if local:
        struct.pack_into("<I", b, info.header_offset + 22, size)
    if central:
        pos, n = 0, -1
        while n < member:
            pos = b.index(b"PK\x01\x02", pos + 1 if n >= 0 else 0)
            n += 1
        struct.pack_into("<I", b, pos + 24, size)
    return bytes(b)


def _no_inflating(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a member was opened (inflated)")

    monkeypatch.setattr(zipfile.ZipFile, "open", refuse)


def test_npz_whose_directory_claims_too_much_is_refused_before_inflating(monkeypatch):
    """A zip bomb: members each under the element limit whose directory sizes add up past the limit on what one
    file may inflate to; refused (too large) from the zip directory, no member opened."""
    lat = np.zeros((16, 2, 2), np.float32)
    data = _npz({f"m{i}": lat for i in range(3)})
    for i in range(3):
        data = _lie(data, i, 0x7FFF_FFFF)  # 3 x 2 GiB claimed, local headers agreeing
    _no_inflating(monkeypatch)
    with pytest.raises(TooLarge, match="inflate to 6,442,450,941 bytes, over the limit"):
        read_latents("x.npz", data)


def test_real_npz_bomb_and_member_count_are_bounded():
    """A real bomb (megabytes of zeros in a few KiB) and too many members, against the stage's own bounds (the
    endpoint's are tighter than a job's): refused as too large, every row failed with the reason."""
    zeros = np.zeros((16, 256, 256), np.float32)  # 4 MiB each, ~4 KiB compressed
    bomb = _npz({f"m{i}": zeros for i in range(4)})
    assert len(bomb) < 100_000
    stage = LatentStage(get_preset("flux-2k"), max_bytes=8 << 20, max_members=8)
    many = _npz({f"m{i}": np.zeros((16, 2, 2), np.float32) for i in range(9)})
    rows = run_stage(stage, "latent", [ENTER({"key": "b.npz", "bytes": bomb, "latent_id": "m0"}),
                                       ENTER({"key": "n.npz", "bytes": many, "latent_id": "m0"})])  # fmt: skip
    assert [r["error_kind"] for r in rows] == ["too_large", "too_large"]
    assert "would inflate to 16,7" in rows[0]["error"] and "9 members, over the limit of 8" in rows[1]["error"]


@pytest.mark.parametrize("where", ["central", "both"])
def test_npz_member_sizes_that_lie_are_refused(monkeypatch, where):
    """A member whose directory entry disagrees with its local header, or whose declared size (both agreeing) is
    smaller than what it inflates to, is refused with a sentence, never inflated past what it declared."""
    data = _zip({"a": np.ones((16, 4, 4), np.float32)})
    lied = _lie(data, 0, 200, local=where == "both")
    with pytest.raises(BadInput) as e:
        read_latents("x.npz", lied)
    assert ("disagree" if where == "central" else "does not inflate to the 200 bytes") in str(e.value)
    assert not PYTHON_SPEAK.search(str(e.value))
    # the data itself damaged (a wrong CRC): found while inflating
    b = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    b[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF
    with pytest.raises(BadInput, match="damaged|not a readable|claims"):
        read_latents("x.npz", bytes(b))


def test_batch_file_is_read_and_indexed_once_for_all_its_rows(tmp_path, monkeypatch):
    """N rows of one batch file (an .npz, a safetensors of named tensors): one read, one index, whatever N; the
    latents are each their own. A new version of the file is indexed anew."""
    import pipeline.latents.file as latents  # where LatentFile reads a safetensors header

    n = 200
    g = np.random.default_rng(0)
    arrays = {f"id{i:03d}": g.standard_normal((16, 2, 2)).astype(np.float32) for i in range(n)}
    (tmp_path / "b.npz").write_bytes(_npz(arrays))
    (tmp_path / "b.safetensors").write_bytes(st_save({k: torch.from_numpy(v) for k, v in arrays.items()}))
    zips, headers, reads = [], [], []
    real_zip, real_header, real_read = zipfile.ZipFile, latents.st_header, Location.read_versioned
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: zips.append(1) or real_zip(*a, **k))
    monkeypatch.setattr(latents, "st_header", lambda *a: headers.append(1) or real_header(*a))
    monkeypatch.setattr(Location, "read_versioned", lambda self, k, *a: reads.append(k) or real_read(self, k, *a))
    read, stage = ReadStage(Location(str(tmp_path))), LatentStage(get_preset("flux-2k"))
    for name in ("b.npz", "b.safetensors"):
        rows = [{"key": f"{name}#{i}", "src_key": name, "latent_id": i} for i in sorted(arrays)]
        rows = run_stage(stage, "latent", run_stage(read, "read", [ENTER(r) for r in rows]))
        assert all(r.get("status") != "failed" for r in rows), rows[0].get("error")
        assert all(np.array_equal(r["latent"], arrays[r["latent_id"]]) for r in rows)
    assert (len(zips), len(headers), reads) == (1, 1, ["b.npz", "b.safetensors"])
    data = (tmp_path / "b.npz").read_bytes()
    for version in ((1,), (1,), (2,)):
        stage.process(ENTER({"key": "b.npz#id000", "src_key": "b.npz", "latent_id": "id000", "bytes": data,
                             "src_version": version}))  # fmt: skip
    assert len(zips) == 3  # (1,) once, then (2,) anew


def test_files_over_the_limit_are_refused_from_their_size(tmp_path, monkeypatch):
    """A sparse 1.5 GiB latent file is refused at planning from the listing (nothing read), and a file that grew
    past the limit after planning is refused by the read stage from its size, never read in full."""
    from jobs.plan import plan_job
    from pipeline.stages import UpscaleOptions

    src = tmp_path / "src"
    src.mkdir()
    for name in ("big.npz", "big.safetensors"):
        with open(src / name, "wb") as f:
            f.truncate(3 << 29)
    (src / "ok.npy").write_bytes(b"\x93NUMPY")
    touched = []
    real_open, real_read = LocalLocation.open, Location.read  # open: the local backend's own
    monkeypatch.setattr(LocalLocation, "open", lambda self, k: touched.append(k) or real_open(self, k))
    monkeypatch.setattr(Location, "read", lambda self, k, *a, **kw: touched.append(k) or real_read(self, k, *a, **kw))

    from jobs.pipeline import JobConfig
    from pipeline.runtime import ModelOptions

    cfg = JobConfig(str(src), str(tmp_path / "d"), ModelOptions("flux-2k"), UpscaleOptions(), progress=False,
                    workflow="decode")  # fmt: skip
    plan = plan_job(cfg)
    assert touched == []
    rejected = {r["key"]: r for r in plan.rejected}
    assert set(rejected) == {"big.npz", "big.safetensors"}
    assert all(r["error_kind"] == "too_large" and "over the limit" in r["error"] for r in rejected.values())
    (src / "grown.npy").write_bytes(b"x" * 1000)
    with pytest.raises(TooLarge, match="1,000 bytes, over the limit of 100"):
        Location(str(src)).read("grown.npy", limit=100)
    with pytest.raises(TooLarge, match="over the limit"):
        ReadStage(Location(str(src))).process({"key": "big.npz"})


def _st_raw(header, data: bytes = b"", length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


F32 = {"dtype": "F32", "shape": [16, 1, 1], "data_offsets": [0, 64]}
MALFORMED = [
    (_st_raw({"a": "x"}), "must be an object with dtype, shape and data_offsets"),
    (_st_raw({"a": {**F32, "shape": "abc"}}, b"\0" * 64), "shape that is not a list"),
    (_st_raw({"a": {**F32, "shape": 5}}, b"\0" * 64), "shape that is not a list"),
    (_st_raw({"a": {**F32, "shape": [16, True, 1]}}, b"\0" * 64), "shape that is not a list"),
    (_st_raw({"a": {**F32, "dtype": {"x": 1}}}, b"\0" * 64), "unknown dtype"),
    (_st_raw({"a": {**F32, "data_offsets": [0, 4]}}, b"\0" * 64), "span 4 bytes"),
    (_st_raw({"a": {**F32, "data_offsets": "0-64"}}, b"\0" * 64), "data_offsets that are not"),
    (_st_raw({"a": F32}, b"\0" * 10), "past the 10"),
    (_st_raw({"a": {**F32, "dtype": "I32"}}, b"\0" * 64), "must be floating point"),
    (_st_raw({"a": {**F32, "shape": [1 << 20, 1 << 20, 1]}}), "over the limit"),
    (_st_raw({"a": F32}, length=1 << 30), "over the limit"),
    (_st_raw({"a": F32}, length=5000), "claims 5,000 bytes"),
    (_st_raw(b"[" * 100_000 + b"]" * 100_000), "nests 100000 levels"),
    (_st_raw([1, 2]), "not a JSON object"),
    (
        _st_raw(b'{"\\ud800": {"dtype": "F32", "shape": [16, 1, 1], "data_offsets": [0, 64]}}', b"\0" * 64),
        "tensor name is not valid text",
    ),
    (_st_raw({"a": F32, "__metadata__": "x"}, b"\0" * 64), "metadata must be a JSON object of strings"),
    (_st_raw({"a": F32, "__metadata__": {"sigma": "abc"}}, b"\0" * 64), "sigma must be a number"),
    (_st_raw({"a": F32, "__metadata__": {"caption": "x" * 5000}}, b"\0" * 64), "over the limit of 4,000"),
    (_st_raw({"a": F32, "b": F32, "__metadata__": {"captions": '{"a": "\\ud800"}'}}, b"\0" * 64), "not valid text"),
    (_st_raw({"a": F32, "b": F32, "__metadata__": {"captions": "[1]"}}, b"\0" * 64), "captions' must be"),
    (_st_raw({"a": F32, "b": F32, "__metadata__": {"captions": '{"a": 3}'}}, b"\0" * 64), "captions' must be"),
    (_st_raw({"a": F32, "b": F32, "__metadata__": {"sigmas": '{"a": "x"}'}}, b"\0" * 64), "must be a number"),
    (_st_raw({"a": F32, "b": F32, "__metadata__": {"sigmas": '{"a": 1e400}'}}, b"\0" * 64), "finite number"),
    (
        _st_raw(
            {"z": {**F32, "shape": [2, 16, 1, 1], "data_offsets": [0, 128]}, "__metadata__": {"ids": "{}"}}, b"\0" * 128
        ),
        "'ids' must be a list",
    ),  # fmt: skip
]


@pytest.mark.parametrize("data,message", MALFORMED)
def test_malformed_safetensors_fail_their_row_with_a_sentence(data, message):
    """Headers of the wrong type, shape, dtype, offsets, depth or size: the row fails as bad input with a sentence
    naming the tensor or field, never Python's own words."""
    (row,) = run_stage(LatentStage(get_preset("flux-2k")), "latent", [ENTER({"key": "x.safetensors", "bytes": data})])
    assert row["status"] == "failed" and row["error_kind"] in ("bad_input", "too_large"), row
    assert message in row["error"], row["error"]
    assert not PYTHON_SPEAK.search(row["error"]), row["error"]


@pytest.mark.parametrize(
    "arrays,message",
    [({"a": np.zeros((16, 1, 1), np.float32), "__sigma__": np.array([0.1, 0.2])}, "must hold one value, got 2"),
     ({"a": np.zeros((16, 1, 1), np.float32), "__sigma__": np.array("x")}, "must be a number"),
     ({"a": np.zeros((16, 1, 1), np.float32), "__caption__": np.array(3.0)}, "must be text"),
     ({"a": np.zeros((16, 1, 1), np.float32), "__sigma__": np.array(np.inf)}, "finite number"),
     ({"a": np.array(["x"] * 16).reshape(16, 1, 1)}, "must be floating point"),
     ({"a": np.zeros((16, 1, 1), [("x", "<f4")])}, "must be floating point"),
     ({"a": np.zeros((1,), "V100")}, "must be floating point")],
)  # fmt: skip
def test_npz_special_and_typed_members_fail_with_a_sentence(arrays, message):
    stage = LatentStage(get_preset("flux-2k"))
    (row,) = run_stage(stage, "latent", [ENTER({"key": "x.npz", "bytes": _npz(arrays), "latent_id": "a"})])
    assert row["status"] == "failed" and message in row["error"] and not PYTHON_SPEAK.search(row["error"]), row


@pytest.mark.slow
def test_s3_reads_are_bounded_and_npz_ids_come_from_ranged_reads(s3_server):
    """On S3 too: an object over the limit is refused from its size; an .npz's ids are listed from ranged reads
    of its zip directory (a few small GETs, never the whole object)."""
    import boto3

    from pipeline.latents import npz_ids
    from pipeline.storage import S3Settings

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="lat")
    arrays = {f"id{i}": np.zeros((16, 64, 64), np.float32) for i in range(20)}
    data = _npz(arrays, compressed=False)
    client.put_object(Bucket="lat", Key="p/b.npz", Body=data)
    loc = Location("s3://lat/p", S3Settings(endpoint_url=s3_server, region="us-east-1"))
    with pytest.raises(TooLarge, match="over the limit of 1,000"):
        loc.read("b.npz", limit=1000)
    got = []
    with loc.open("b.npz") as f:
        real = f.readinto
        f.readinto = lambda b: got.append(len(b)) or real(b)
        assert npz_ids(f) == sorted(arrays)
    assert sum(got) < len(data) // 50, got
    assert loc.read_versioned("b.npz")[0] == data
