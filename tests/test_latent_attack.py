"""Inputs crafted to cost memory, time or a model run before they fail: latent files whose .npy headers claim more
than they hold or than any output may be, zip members that inflate past what they declare, batch files of 100,000
ids, and output names too long for a file system or S3 (refused at planning, before any model loads)."""

import io
import json
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npf
from PIL import Image

from pipeline.errors import BadInput, TooLarge
from pipeline.latents import open_latents, output_limit
from pipeline.model.presets import get_preset
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions, run_stage
from pipeline.stages.latent import LatentStage
from pipeline.storage import Entry, Location
from pipeline.workflow import resolve_workflow

from conftest import ROOT

MB = 1 << 20


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _zip(members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _declare(data: bytes, size: int, crc: int | None = None) -> bytes:
    """The zip's only member declared `size` bytes uncompressed (and `crc`), in its local header and its directory
    alike, whatever its compressed stream really holds."""
    b = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    central = b.index(b"PK\x01\x02")
    for at in (info.header_offset + 14, central + 16):  # crc-32, compressed size, uncompressed size
        struct.pack_into("<I", b, at, info.CRC if crc is None else crc)
        struct.pack_into("<I", b, at + 8, size)
    return bytes(b)


def _peak(fn):
    """(what fn returned or raised, the most memory Python and numpy held meanwhile)."""
    tracemalloc.start()
    try:
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - returned for the test to look at
            got = e
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------- headers that lie
def test_npz_whose_header_claims_a_huge_array_fails_its_row_from_the_header():
    """A 1 MB .npz whose member's .npy header says 131040x131072: its row fails (too large) with the shape in the
    reason, and nothing near the claimed size is ever allocated or inflated."""
    body = _npy_header((131040, 131072)) + bytes(MB)
    data = _zip({"a.npy": body})
    assert len(data) < 2 * MB
    stage = LatentStage(get_preset("flux-2k"))
    row = resolve_workflow("decode", ModelOptions("flux-2k")).enter({"key": "x.npz#a", "src_key": "x.npz",
                                                                     "latent_id": "a", "bytes": data})  # fmt: skip
    rows, peak = _peak(lambda: run_stage(stage, "latent", [row]))
    (row,) = rows
    assert row["status"] == "failed" and row["error_kind"] == "too_large", row
    assert "[131040, 131072]" in row["error"], row["error"]
    assert peak < 100 * MB, peak
    # the same claim with the zip declaring the member that large: the header's own size is still over the limit
    lied = _declare(data, 0xFFFF_FFF0)
    got, peak = _peak(lambda: open_latents("x.npz", lied, max_bytes=1 << 33).item("a"))
    assert isinstance(got, TooLarge) and "[131040, 131072]" in str(got) and peak < 100 * MB


def test_header_claiming_more_than_the_member_holds_is_refused():
    """Within the element limit, but more data than the member's declared size: a lie, refused from the header
    (the shape named), in an .npz and in a plain .npy alike."""
    body = _npy_header((16, 1024, 1024)) + bytes(MB)
    for name, data in (("x.npz", _zip({"a.npy": body})), ("x.npy", body)):
        f = open_latents(name, data)
        got, peak = _peak(lambda f=f: f.item(f.ids[0]))
        assert isinstance(got, BadInput) and "claims 67,108,864 bytes" in str(got), got
        assert "[16, 1024, 1024]" in str(got) and peak < 10 * MB


def test_latent_whose_output_is_over_the_limit_is_refused_before_its_data_is_read():
    """An honest header of 1 GiB of float32 ([16, 4095, 4096], the size a 1 MB .npz of zeros holds) whose output
    (131040x131072) is over the output-size limit: refused from the header with the shape and the output size, no
    byte of its data inflated; a latent within the limit passes the same check."""
    flux = get_preset("flux-2k")
    shape = (16, 4095, 4096)
    header = _npy_header(shape)
    data = _declare(_zip({"a.npy": header + bytes(64)}), len(header) + 4 * int(np.prod(shape)))
    f = open_latents("x.npz", data)
    got, peak = _peak(lambda: f.item("a", limit=output_limit(flux, UpscaleOptions())))
    assert isinstance(got, TooLarge), got
    assert "[16, 4095, 4096]" in str(got) and "output would be 131072x131040" in str(got)
    assert peak < 10 * MB, peak
    # the same from a plain .npy and a safetensors header, and -s beyond the limit
    from safetensors.numpy import save as st_save

    small = np.zeros((16, 256, 256), np.float32)
    npy = io.BytesIO()
    np.save(npy, small)
    limit = output_limit(flux, UpscaleOptions())  # 256 x 8 x 4 = 8192: within 16384
    assert open_latents("x.npy", npy.getvalue()).item("", limit=limit).latent.shape == small.shape
    assert open_latents("x.safetensors", st_save({"a": small})).item("", limit=limit).latent.shape == small.shape
    scaled = output_limit(flux, UpscaleOptions(scale=16))
    with pytest.raises(TooLarge, match=r"shape \[16, 256, 256\]: output would be 32768x32768"):
        open_latents("x.safetensors", st_save({"a": small})).item("", limit=scaled)


def test_member_that_inflates_past_its_declared_size_is_read_only_that_far():
    """A member whose zip headers declare a few bytes while its deflate stream holds 200 MB: at most the declared
    bytes are inflated (the rest never is), whether its checksum fits the declared part (read) or not (refused)."""
    header = _npy_header((16, 1, 1))
    body = header + bytes(200 * MB)  # ~200 KB compressed
    declared = len(header) + 64
    data = _zip({"a.npy": body})
    fits = _declare(data, declared, crc=zlib.crc32(body[:declared]))
    got, peak = _peak(lambda: open_latents("x.npz", fits).item("a"))
    assert not isinstance(got, Exception) and got.latent.shape == (16, 1, 1)
    assert peak < 20 * MB, peak
    got, peak = _peak(lambda: open_latents("x.npz", _declare(data, declared)).item("a"))
    assert isinstance(got, BadInput) and "damaged" in str(got) and peak < 20 * MB, got


def test_member_compressed_otherwise_than_numpy_writes_is_refused():
    """bzip2 and lzma cannot be told to stop inflating at a size: a member compressed so is refused unread."""
    npy = io.BytesIO()
    np.save(npy, np.zeros((16, 2, 2), np.float32))
    data = _zip({"a.npy": npy.getvalue()}, zipfile.ZIP_BZIP2)
    with pytest.raises(BadInput, match="must be stored or deflated"):
        open_latents("x.npz", data).item("a")


def test_shape_that_is_no_latent_is_refused_from_its_header():
    """A 2-D 16384x16384 array (1 GiB, as the member declares): refused as no latent's shape, nothing inflated."""
    header = _npy_header((16384, 16384))
    data = _declare(_zip({"a.npy": header + bytes(64)}), len(header) + (1 << 30))
    got, peak = _peak(lambda: open_latents("x.npz", data, max_bytes=1 << 31).item("a"))
    assert isinstance(got, BadInput) and "must be [C, h, w]" in str(got) and "[16384, 16384]" in str(got), got
    assert peak < 10 * MB, peak


# ---------------------------------------------------------------------------------------------- 100,000 ids
def _stored_npz(names: list[str], body: bytes) -> bytes:
    """An uncompressed .npz of one body under many names, written directly (zipfile takes far longer)."""
    crc = zlib.crc32(body)
    local, central = bytearray(), bytearray()
    for name in names:
        n = name.encode()
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0x800, 0, 0, 0x21, crc, len(body), len(body),
                               len(n), 0, 0, 0, 0, 0, len(local)) + n  # fmt: skip
        local += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0x800, 0, 0, 0x21, crc, len(body), len(body), len(n), 0)
        local += n + body
    count = min(len(names), 0xFFFF)  # past 65,535 the end record's count says "see the directory"
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local), 0)
    return bytes(local + central + end)


def test_batch_file_of_100k_ids_is_listed_and_looked_up_in_constant_time(tmp_path):
    """An .npz of 100,000 latents: its ids listed at planning, and each row's latent found by its id through a
    dict (no scan of the id list per row), so the last rows of the file cost what the first do."""
    from jobs.latent_plan import _latent_inputs

    npy = io.BytesIO()
    np.save(npy, np.zeros((16, 1, 1), np.float32))
    ids = [f"id{i:06d}" for i in range(100_000)]
    data = _stored_npz([f"{i}.npy" for i in ids], npy.getvalue())
    (tmp_path / "b.npz").write_bytes(data)
    src = Location(str(tmp_path))
    t = time.perf_counter()
    inputs, bad = _latent_inputs(src, [Entry("b.npz", len(data))])
    listed = time.perf_counter() - t
    assert bad == [] and len(inputs) == 100_000
    f = open_latents("b.npz", data)
    assert isinstance(f.index, dict) and len(f.index) == 100_000
    t = time.perf_counter()
    for i in ids[-5000:]:  # the end of the list: a list's `in` would compare ~100,000 ids for each
        f.item(i)
    looked_up = time.perf_counter() - t
    assert listed < 20 and looked_up < 20, (listed, looked_up)


# ---------------------------------------------------------------------------------------------- names too long
def _pidray(*args) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "pidray"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pidray.cli"]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _rows(dst: Path) -> dict[str, dict]:
    from jobs.manifest import read_manifest

    return {r["key"]: r for r in read_manifest(Location(str(dst)))}


def test_output_name_over_255_bytes_fails_at_planning_via_the_cli(tmp_path, bicubic_weights):
    """`pidray upscale SRC DST --suffix <130 x é>`: the output name would be 267 bytes; the input fails at planning
    (bad_input, the reason says so and how to fix it) instead of failing its write after the model ran; an input
    whose name fits is upscaled beside it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(src / "a.png")
    Image.new("RGB", (8, 8), (20, 30, 200)).save(src / ("b" * 200 + ".png"))
    suffix = "_" + "é" * 25  # 51 bytes: a.png's output fits, b...b's (200 + 51 + 5) does not
    r = _pidray("upscale", str(src), str(dst), "--suffix", suffix, "--local", "--weights", bicubic_weights)
    assert r.returncode == 3, (r.stdout, r.stderr)
    rows = _rows(dst)
    long = rows["b" * 200 + ".png"]
    assert long["status"] == "failed" and long["error_kind"] == "bad_input", long
    assert long["error"].startswith("plan: ") and "over the limit of 255 bytes" in long["error"], long["error"]
    assert "--suffix" in long["error"]
    assert rows["a.png"]["status"] == "ok" and (dst / f"a{suffix}.png").exists()
    assert [p.name for p in dst.glob("b*")] == []


def test_long_latent_id_fails_its_row_at_planning(tmp_path):
    """A batch .npz with an id of 100 four-byte characters: its output name would be over 255 bytes, so that latent
    fails at planning with the reason; its neighbour is planned."""
    from jobs.pipeline import JobConfig
    from jobs.plan import plan_job
    from pipeline.runtime import ModelOptions

    src = tmp_path / "src"
    src.mkdir()
    long_id = "\U00020000" * 100  # a CJK letter outside the BMP: a word character, 4 bytes in UTF-8
    buf = io.BytesIO()
    np.savez(buf, **{long_id: np.zeros((16, 2, 2), np.float32), "ok": np.zeros((16, 2, 2), np.float32)})
    (src / "b.npz").write_bytes(buf.getvalue())
    cfg = JobConfig(str(src), str(tmp_path / "dst"), ModelOptions("flux-2k"), UpscaleOptions(), progress=False,
                    workflow="decode")  # fmt: skip
    plan = plan_job(cfg)
    assert [r["latent_id"] for r in plan.todo] == ["ok"]
    (row,) = plan.rejected
    assert row["key"] == f"b.npz#{long_id}" and row["error_kind"] == "bad_input", row
    assert row["error"].startswith("plan: ") and "over the limit of 255 bytes" in row["error"], row["error"]


def test_prompt_names_are_cut_to_fit_a_file_name_and_a_long_suffix_fails_the_line(tmp_path):
    """A prompt name counts bytes, not only characters: 96 four-byte letters (384 bytes) are cut on a character
    boundary to 192 bytes; 70 emoji (not word characters) give the line's own name; with a --suffix that makes a
    name too long for a file, that line fails at planning (bad_input) while a short name is planned."""
    from jobs.pipeline import JobConfig
    from jobs.plan import plan_job
    from pipeline.runtime import ModelOptions

    from conftest import make_tiny_t2i

    preset = make_tiny_t2i(tmp_path)
    prompts = tmp_path / "p.jsonl"
    letters = "\U00020000" * 96
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "a cat", "name": letters}, {"prompt": "a dog", "name": "\U0001f600" * 70},
        {"prompt": "a cat", "name": "cat"},
    ]))  # fmt: skip

    def plan(suffix=""):
        cfg = JobConfig(str(prompts), str(tmp_path / "dst"), ModelOptions(str(preset)), UpscaleOptions(format="png"),
                        progress=False, workflow="generate", suffix=suffix)  # fmt: skip
        p = plan_job(cfg)
        line = lambda r: int(r["key"].rsplit(":", 1)[1])  # noqa: E731
        return {line(r): r for r in p.todo}, {line(r): r for r in p.rejected}

    todo, rejected = plan()
    assert rejected == {} and sorted(todo) == [1, 2, 3]
    assert todo[1]["output_stem"] == "\U00020000" * 48 and len(todo[1]["output_stem"].encode()) == 192
    assert todo[2]["output_stem"] == "000002-image" and todo[3]["output_stem"] == "cat"
    todo, rejected = plan("_" + "x" * 80)
    assert sorted(todo) == [2, 3] and sorted(rejected) == [1]
    assert rejected[1]["error_kind"] == "bad_input" and rejected[1]["error"].startswith("plan: line 1: ")
    assert "over the limit of 255 bytes" in rejected[1]["error"]


def test_a_header_that_is_no_dict_and_a_tampered_zip_directory_are_bad_inputs():
    """Two damaged files a fuzzer found: a .npy header whose dict is never closed (numpy raises a tokenizer error)
    and an .npz whose directory offset was moved (a negative seek): each a BadInput naming the file or member."""
    import io
    import struct

    from pipeline.errors import BadInput
    from pipeline.latents import open_latents

    hdr = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8, 8), "
    hdr = hdr + b" " * (64 - 10 - len(hdr) - 1) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr + bytes(4 * 8 * 8 * 4)
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((4, 8, 8), np.float32))
    z = bytearray(buf.getvalue())
    end = z.rfind(b"PK\x05\x06")
    z[end + 16 : end + 20] = struct.pack("<I", struct.unpack("<I", z[end + 16 : end + 20])[0] + 5)
    for name, data, says in (("bad.npy", npy, "header is damaged"), ("neg.npz", bytes(z), "'a.npy' is damaged")):
        with pytest.raises(BadInput, match=says):
            f = open_latents(name, data)
            for i in f.ids:
                f.item(i)
