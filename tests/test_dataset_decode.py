"""`pidray decode SRC DST --dataset webdataset|parquet`: latent files as WebDataset members or Parquet cells, decoded
by a released preset in miniature (random weights of the real classes). Each decoded image is the one the decode
workflow's graph makes of that latent (same seed, caption and sigma); a member or cell that is not a latent, a file
of two latents and a sample without one fail alone with their reasons; --ray gives the local loop's bytes."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save
from test_dataset_job import leftovers, pidray, rows_by_key
from test_datasets import make_tar

from pipeline.datasets import ShardReader
from pipeline.noise import file_seed


def latent(i: int) -> torch.Tensor:
    return torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(i))


def npy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.numpy())
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(golden_dir, tmp_path_factory):
    from test_encoders import build_stand_in

    from pipeline.runtime import ModelOptions

    root = tmp_path_factory.mktemp("flux")
    build_stand_in("flux-2k", golden_dir, root)
    return ModelOptions(str(root / "preset.json"), weights=str(root))


def flags(model) -> list[str]:
    return ["-m", model.preset, "--weights", model.weights, "--device", "cpu", "--format", "png", "--seed", "3",
            "--overlap", "1", "--no-progress"]  # fmt: skip


def reference(model, sid: str, data: bytes, caption: str | None = None, **extra) -> np.ndarray:
    """The decode workflow's image of one latent file's bytes, with the seed a dataset job gives sample `sid`."""
    from pipeline.graph import StageGraph
    from pipeline.latents import latent_extension
    from pipeline.stages import UpscaleOptions

    row = {"key": sid, "bytes": data, "src_key": "latent" + latent_extension(data), "seed": file_seed(3, sid), **extra}
    row.update({"caption": caption} if caption else {})
    (out,) = StageGraph(model, UpscaleOptions(seed=3, overlap=1), "decode").run_local([row])
    assert out["status"] == "ok", out.get("error")
    return pixels(out["output"])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def same(got: np.ndarray, want: np.ndarray) -> None:
    """The same image up to float rounding: the job's process runs torch on another thread count than the test's,
    which changes the order of float sums (seen: one pixel in 36,864 one level apart). At most one level, on at most
    0.1% of the pixels; anything the job did otherwise (seed, caption, sigma, size) changes far more."""
    assert got.shape == want.shape
    d = np.abs(got.astype(np.int16) - want)
    assert d.max() <= 1 and (d > 0).mean() <= 1e-3, (d.max(), (d > 0).mean())


@pytest.mark.slow
def test_webdataset_shards_of_latents(model, tmp_path):
    """A shard of latent members (safetensors with a caption and JSON beside it, npy; one not a latent, one of two
    latents, one sample without any): the decoded image replaces the latent member, every other member kept byte for
    byte and in order; the failures recorded with their reasons; --ray writes the same bytes as the local loop."""
    src = tmp_path / "src"
    src.mkdir()
    a, b = st_save({"z": latent(0)}), npy(latent(1))
    (src / "00000.tar").write_bytes(make_tar([
        ("a.safetensors", a), ("a.txt", b"a cat\n"), ("a.json", b'{"w": 1}'),
        ("b.npy", b),
        ("junk.npy", b"not a latent"),
        ("two.safetensors", st_save({"x": latent(2), "y": latent(3)})),
        ("none.txt", b"no latent here"),
    ]))  # fmt: skip
    out = pidray("decode", src, tmp_path / "local", *flags(model), "--local")
    assert out.returncode == 3, out.stderr  # some samples failed: listed, the job went on
    assert "--dataset webdataset" in out.stderr
    dst = tmp_path / "local"
    got = list(ShardReader(open(dst / "00000.tar", "rb"), "00000.tar"))
    assert [s.key for s in got] == ["a", "b"]
    assert [e for e, _ in got[0].members] == ["png", "txt", "json"] and got[0].members[1:] == [
        ("txt", b"a cat\n"), ("json", b'{"w": 1}')]  # fmt: skip
    same(pixels(got[0].image), reference(model, "00000.tar#a", a, "a cat"))
    same(pixels(got[1].image), reference(model, "00000.tar#b", b))
    assert pixels(got[0].image).shape == (128, 96, 3)
    rows = rows_by_key(dst)
    assert rows["00000.tar#a"]["caption"] == "a cat" and rows["00000.tar#a"]["status"] == "ok"
    assert "not a latent file" in rows["00000.tar#junk"]["error"]
    assert "holds 2 latents" in rows["00000.tar#two"]["error"]
    assert "no latent member (looked for safetensors/npy/npz" in rows["00000.tar#none"]["error"]
    assert leftovers(dst) == []
    on_ray = pidray("decode", src, tmp_path / "ray", *flags(model), "--ray")
    assert on_ray.returncode == 3, on_ray.stderr
    assert (tmp_path / "ray" / "00000.tar").read_bytes() == (dst / "00000.tar").read_bytes()


@pytest.mark.slow
def test_parquet_tables_of_latents(model, tmp_path):
    """A table whose latent column holds safetensors and npy bytes, a null and garbage, with a sigma for a captured
    x_t: the same schema, rows and other columns; the latent column holds each decoded image (null where it failed)."""
    src = tmp_path / "src"
    src.mkdir()
    a, b = st_save({"z": latent(4)}), npy(latent(5))
    table = pa.table({"id": [7, 8, 9, 10], "z": pa.array([a, None, b"junk", b], pa.binary()),
                      "text": ["a dog", None, "x", None]})  # fmt: skip
    pq.write_table(table, src / "t.parquet", row_group_size=3)
    out = pidray("decode", src, tmp_path / "out", *flags(model), "--latent-column", "z", "--caption-column", "text",
                 "--sigma", "0.5")  # fmt: skip
    assert out.returncode == 3, out.stderr
    back = pq.read_table(tmp_path / "out" / "t.parquet")
    assert back.schema == table.schema and back.drop(["z"]).equals(table.drop(["z"]))
    cells = back.column("z").to_pylist()
    assert cells[1] is None and cells[2] is None
    same(pixels(cells[0]), reference(model, "t.parquet#0", a, "a dog", sigma=0.5))
    same(pixels(cells[3]), reference(model, "t.parquet#3", b, sigma=0.5))
    rows = rows_by_key(tmp_path / "out")
    assert "no latent: the 'z' cell is null" in rows["t.parquet#1"]["error"]
    assert "not a latent file" in rows["t.parquet#2"]["error"]


def test_decode_dataset_flags_are_refused_in_one_line(tmp_path):
    """The latent flags name what a decode job reads; on files they are refused in one line, and the image flags are
    not decode's."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.npy").write_bytes(npy(latent(0)))
    out = pidray("decode", src, tmp_path / "out", "--latent-key", "npy", "--device", "cpu")
    assert out.returncode == 2 and "--latent-key is for a dataset job" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = pidray("decode", src, tmp_path / "out", "--image-column", "x", "--device", "cpu")
    assert out.returncode == 2 and "--image-column" in out.stderr
    out = pidray("upscale", src, tmp_path / "out", "--latent-key", "npy", "--device", "cpu")
    assert out.returncode == 2 and "--latent-key" in out.stderr
