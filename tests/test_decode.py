"""Latent decode (issue 14): a generator's latent -> PiD, through the same stage graph and job as upscaling."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save
from test_encoders import stand_in  # noqa: F401  (the fixture: released presets in miniature)

from pipeline.graph import StageGraph
from pipeline.stages import UpscaleOptions

from conftest import png_bytes


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _image(hw, seed=0) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8)))


@pytest.mark.parametrize("name", ["flux-2k", "sdxl-2kto4k"])
@pytest.mark.parametrize("hw", [(32, 24), (56, 56)])  # one tile; 2×2 tiles that cover the latent exactly
def test_decoding_our_own_latent_equals_upscaling_the_image(stand_in, name, hw):  # noqa: F811
    """The latent our encoder makes of an image, decoded, gives exactly the pixels of upscaling that image (same
    preset, seed, degrade_sigma): the decode workflow is the upscale workflow with the latent given."""
    opts = stand_in(name)
    options = UpscaleOptions(overlap=1, degrade_sigma=0.3, seed=7)
    up = StageGraph(opts, options)
    data = _image(hw)
    (want,) = list(up.run_local([{"key": "img.png", "bytes": data}]))
    assert want["status"] == "ok", want.get("error")
    enc = up["encode"].build()
    rows = enc.process_batch([up["decode"].build().process(up.workflow.enter({"key": "img.png", "bytes": data}))])
    latent = torch.from_numpy(rows[0]["latent"])
    assert tuple(latent.shape[1:]) == tuple(rows[0]["plan"].tile) or rows[0]["plan"].grid != (1, 1)
    file = st_save({"latent": latent}, metadata={"format": "sdxl" if name.startswith("sdxl") else "flux"})
    down = StageGraph(opts, options, workflow="decode")
    (got,) = list(down.run_local([{"key": "lat.safetensors", "bytes": file}]))
    assert got["status"] == "ok", got.get("error")
    assert got["out_hw"] == want["out_hw"] == [hw[0] * 4, hw[1] * 4]
    assert np.array_equal(_pixels(got["output"]), _pixels(want["output"]))


def _st(tensors: dict, **meta) -> bytes:
    return st_save(
        {k: torch.as_tensor(v).contiguous() for k, v in tensors.items()},
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()} or None,
    )


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def test_decode_job_records_every_bad_latent_and_goes_on(stand_in, tmp_path):  # noqa: F811
    """A folder of latent files through `run_job` (the bulk job's own code): one latent per file, batches with ids
    (named tensors, metadata ids, .npz), and every kind of bad latent, each failed with its reason in the manifest
    while the good ones are written, at latent × 8 × 4 pixels."""
    from jobs.manifest import read_manifest
    from jobs.pipeline import JobConfig, run_job
    from pipeline.storage import Location

    opts = stand_in("flux-2k")
    g = np.random.default_rng(0)
    lat = lambda *s: g.standard_normal(s).astype(np.float32)  # noqa: E731
    bad_nan = lat(16, 4, 3)
    bad_nan[0, 1, 1] = np.nan
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {
        "good.safetensors": _st({"latent": lat(16, 4, 3)}, format="zimage", caption="a cat"),
        "sub/one.npy": _npy(lat(1, 16, 3, 5)),
        "named.safetensors": _st({"cat": lat(16, 4, 3), "dog/../x": bad_nan}),
        "ids.safetensors": _st({"z": lat(2, 16, 2, 2)}, ids=["first", "second"]),
        "pair.npz": None,
        "noids.npy": _npy(lat(2, 16, 4, 3)),
        "noids.safetensors": _st({"z": lat(2, 16, 2, 2)}),
        "channels.npy": _npy(lat(8, 4, 3)),
        "rank.npy": _npy(lat(16, 4)),
        "ints.npy": _npy(np.ones((16, 4, 3), np.int32)),
        "huge.npy": _npy(lat(16, 40, 40)),
        "corrupt.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
        "wrongformat.safetensors": _st({"latent": lat(16, 4, 3)}, format="sdxl"),
        "pickle.npy": b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
        + b" " * 52
        + b"\n"
        + b"\x80\x04K\x01.",
        "notes.txt": b"not a latent",
    }
    buf = io.BytesIO()
    np.savez(buf, a=lat(16, 2, 2), b=lat(16, 2, 2))
    files["pair.npz"] = buf.getvalue()
    for k, v in files.items():
        (src / k).write_bytes(v)
    before = {k: (src / k).read_bytes() for k in files}
    options = UpscaleOptions(overlap=1, max_output_side=1000)
    summary = run_job(JobConfig(str(src), str(tmp_path / "dst"), model=opts, options=options, local=True,
                                workflow="decode", progress=False))  # fmt: skip
    rows = {r["key"]: r for r in read_manifest(Location(str(tmp_path / "dst")))}
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert ok == {"good.safetensors", "sub/one.npy", "named.safetensors#cat", "ids.safetensors#first",
                  "ids.safetensors#second", "pair.npz#a", "pair.npz#b"}  # fmt: skip
    assert (rows["good.safetensors"]["out_h"], rows["good.safetensors"]["out_w"]) == (128, 96)
    assert (rows["sub/one.npy"]["out_h"], rows["sub/one.npy"]["out_w"]) == (96, 160)
    errors = {k: r["error"] for k, r in rows.items() if r["status"] == "failed"}
    expect = {
        "named.safetensors#dog/../x": "NaN or Inf", "noids.npy": "without ids", "noids.safetensors": "without ids",
        "channels.npy": "8 channels", "rank.npy": "must be [C, h, w]", "ints.npy": "floating point",
        "huge.npy": "over the limit", "corrupt.safetensors": "safetensors", "wrongformat.safetensors": "does not fit",
        "pickle.npy": ".npy",
    }  # fmt: skip
    assert set(errors) == set(expect), errors
    for k, want in expect.items():
        assert want in errors[k], (k, errors[k])
    assert summary.ok == 7 and summary.failed == len(expect)
    outs = sorted(p.relative_to(tmp_path / "dst").as_posix() for p in (tmp_path / "dst").rglob("*.png"))
    assert outs == ["good.png", "ids.first.png", "ids.second.png", "named.cat.png", "pair.a.png", "pair.b.png",
                    "sub/one.png"]  # fmt: skip
    assert {k: (src / k).read_bytes() for k in files} == before  # inputs untouched
    assert "notes.txt" not in rows


@pytest.mark.parametrize("name,sigma", [("flux-2k", 0.3), ("sdxl-2kto4k", 0.8)])
def test_captured_xt_is_decoded_at_its_sigma(stand_in, name, sigma):  # noqa: F811
    """A latent captured at scheduler sigma s (the official from_ldm path) is conditioned on as it is: decoding
    x_t = (1 − s)·z + s·ε gives the pixels of decoding z with degrade_sigma s, when ε is the draw the sampler itself
    makes; SDXL's Euler x_t = z + σ·ε moves to the VP frame (x/√(σ²+1), σ/√(σ²+1)) first."""
    import math

    opts = stand_in(name)
    ch = 4 if name.startswith("sdxl") else 16
    z = torch.randn(ch, 4, 3, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(1, ch, 4, 3, generator=torch.Generator().manual_seed(7))[0]  # the sampler's own draw
    if name.startswith("sdxl"):
        xt, s_model = z + sigma * eps, sigma / math.sqrt(sigma**2 + 1)
    else:
        xt, s_model = (1 - sigma) * z + sigma * eps, sigma
    clean = StageGraph(opts, UpscaleOptions(seed=7, degrade_sigma=s_model, overlap=1), workflow="decode")
    (want,) = clean.run_local([{"key": "z.safetensors", "bytes": _st({"z": z})}])
    captured = StageGraph(opts, UpscaleOptions(seed=7, overlap=1), workflow="decode")
    (got,) = captured.run_local([{"key": "x.safetensors", "bytes": _st({"x": xt}, sigma=str(sigma))}])
    assert want["status"] == got["status"] == "ok", (want.get("error"), got.get("error"))
    a, b = _pixels(want["output"]).astype(int), _pixels(got["output"]).astype(int)
    assert np.abs(a - b).max() <= (0 if name == "flux-2k" else 2)
    (plain,) = captured.run_local([{"key": "x.safetensors", "bytes": _st({"x": xt})}])  # the sigma matters
    assert not np.array_equal(_pixels(plain["output"]), b)


def test_explicit_output_size_aligns_the_latent(stand_in):  # noqa: F811
    """--size: the output is exactly that size; the latent is aligned by the network's rule, whatever its grid; a
    size the preset's scale does not divide, or one over the limit, is refused with a message."""
    opts = stand_in("flux-2k")
    z = torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(1))
    g = StageGraph(opts, UpscaleOptions(overlap=1, max_output_side=600), workflow="decode")
    rows = list(g.run_local([{"key": "z.safetensors", "bytes": _st({"z": z}), "out_size": s}
                             for s in ([96, 64], [200, 120], [98, 64], [800, 64])]))  # fmt: skip
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"], [r.get("error") for r in rows]
    assert [Image.open(io.BytesIO(r["output"])).size for r in rows[:2]] == [(64, 96), (120, 200)]
    assert "multiples of the preset's scale 4" in rows[2]["error"] and "over the limit" in rows[3]["error"]


def test_hostile_latent_files_are_refused_before_allocating():
    """A header that claims a huge array (.npy, or inside a compressed .npz: a zip bomb) is refused from the header
    alone; object arrays (pickles) are never loaded; a safetensors header that lies about its length is refused."""
    import struct
    import zipfile

    from pipeline.errors import BadInput
    from pipeline.latents import read_latents

    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100), }"
    hdr = hdr + " " * (118 - len(hdr)) + "\n"
    bomb = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode()
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.npy", bomb + b"\0" * 1000)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [("x.npy", bomb, "over the limit"), ("x.npz", zipped.getvalue(), "over the limit"),
             ("x.npy", obj.getvalue(), "pickle"), ("x.safetensors", struct.pack("<Q", 1 << 40) + b"{}", "header"),
             ("x.safetensors", b"", "shorter")]  # fmt: skip
    for name, data, message in cases:
        with pytest.raises(BadInput, match=message):
            read_latents(name, data)


def test_latent_keys_and_outputs_are_unambiguous_whatever_the_file_names(stand_in, tmp_path):  # noqa: F811
    """`x.npz` holding member `b.npy` beside a file named `x.npz#b.npy`, a `%` in a name, members whose safe names
    coincide (`p/q`, `p_q`) or differ only in case (`A`, `a`): every latent planned is decoded and recorded, each its
    own manifest row and output; --resume finds them all again."""
    from jobs.manifest import read_manifest
    from jobs.pipeline import JobConfig, run_job
    from pipeline.storage import Location

    opts = stand_in("flux-2k")
    g = np.random.default_rng(0)
    lat = lambda: g.standard_normal((16, 2, 2)).astype(np.float32)  # noqa: E731
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name, members in (("x.npz", {"b.npy": lat()}), ("m.npz", {"p/q": lat(), "p_q": lat(), "A": lat(), "a": lat()})):
        buf = io.BytesIO()
        np.savez(buf, **members)
        (src / name).write_bytes(buf.getvalue())
    (src / "x.npz#b.npy").write_bytes(_npy(lat()))
    (src / "50%.npy").write_bytes(_npy(lat()))
    (src / "50%25.npy").write_bytes(_npy(lat()))

    def cfg(**kw):
        return JobConfig(str(src), str(dst), model=opts, options=UpscaleOptions(overlap=1), local=True,
                         workflow="decode", progress=False, **kw)  # fmt: skip

    planned = run_job(cfg(dry_run=True))
    assert sum(r["status"] == "planned" for r in planned.rows) == 8
    summary = run_job(cfg())
    rows = {r["key"]: r for r in read_manifest(Location(str(dst)))}
    assert summary.ok == 8 and len(rows) == 8, sorted(rows)
    assert {"x.npz#b.npy", "x.npz%23b.npy", "50%25.npy", "50%2525.npy", "m.npz#p/q", "m.npz#p_q", "m.npz#A",
            "m.npz#a"} == set(rows)  # fmt: skip
    outs = [r["output_key"] for r in rows.values()]
    assert len({o.casefold() for o in outs}) == 8 and all((dst / o).is_file() for o in outs), outs
    assert run_job(cfg(resume=True)).skipped == 8


@pytest.mark.parametrize(
    "flags,message",
    [(["--sigma", "-1"], "--sigma must be a finite number >= 0"), (["--sigma", "nan"], "--sigma must be a finite"),
     (["--sigma", "5"], "--sigma 5.0 is outside \\[0, 1\\]"), (["--size", "97x64"], "--size 97x64: output size"),
     (["--size", "64x99999"], "--size 64x99999: output side 99999 is over --max-output-side")],
)  # fmt: skip
def test_decode_flags_that_no_latent_can_take_are_refused_up_front(tmp_path, flags, message):
    """Refused before any model loads (the weights named do not exist), exit 2, one line naming the flag."""
    import re
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.npy").write_bytes(_npy(np.zeros((16, 2, 2), np.float32)))
    out = subprocess.run([sys.executable, "-m", "pidray.cli", "decode", str(tmp_path / "in"), str(tmp_path / "out"),
                          "--weights", str(tmp_path / "none"), "--local", *flags], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and re.search(message, lines[0]), out.stderr
    assert "degrade_sigma" not in out.stderr and "none" not in lines[0]
