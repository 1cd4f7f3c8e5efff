"""pidray.data: the stage graph as a step of a user's own Ray Data pipeline (read_parquet -> filter -> upscale ->
write_parquet), and its arguments checked before anything runs."""

from __future__ import annotations

import io
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_datasets import IMAGE, PHOTOS

import pidray.data
from pipeline.errors import BadInput, BadParameter


class FakeSchema:
    def __init__(self, schema: pa.Schema):
        self.base_schema, self.names = schema, schema.names


class FakeDataset:
    """What the checks read of a dataset (its schema); anything that would run it fails the test."""

    def __init__(self, schema: pa.Schema):
        self._schema = FakeSchema(schema)

    def schema(self):
        return self._schema

    def map_batches(self, *a, **kw):
        raise AssertionError("the checks ran the dataset")


SCHEMA = pa.schema([("id", pa.string()), ("image", IMAGE), ("text", pa.string()), ("width", pa.int64())])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_column": "picture"}, BadParameter,
         "the dataset has no column 'picture'; its columns are: id, image, text, width"),
        ({"caption_column": "caption"}, BadParameter, "no column 'caption'; its columns are: id, image"),
        ({"key_column": "name"}, BadParameter, "no column 'name'"),
        ({"image_column": "width"}, BadInput, "column 'width' is int64: an image column must be binary"),
        ({"caption_column": "width"}, BadInput, "caption column 'width' of the dataset is int64, not text"),
        ({"sacle": 2}, BadParameter, "unknown option.s. sacle; the options are: scale, steps"),
        ({"steps": 0}, BadParameter, "steps must be an integer"),
        ({"steps": 50}, BadParameter, "for the distilled preset small"),
        ({"cfg_scale": 3.0}, BadParameter, "apply to the undistilled presets"),
        ({"format": "gifx"}, BadParameter, "unknown output format 'gifx'"),
        ({"quality": 0}, BadParameter, "quality must be"),
        ({"device": 3}, BadParameter, "device must be text"),
        ({"compile": "yes"}, BadParameter, "compile must be True or False"),
        ({"preset": "no-such-preset"}, Exception, "no-such-preset"),
        ({"preset": None}, BadParameter, "preset must be"),
        ({"image_column": 3}, BadParameter, "image_column must be a column name"),
    ],
)  # fmt: skip
def test_arguments_are_checked_before_anything_runs(kwargs, error, match):
    with pytest.raises(error, match=match) as e:
        pidray.data.upscale(FakeDataset(SCHEMA), **kwargs)
    assert "\n" not in str(e.value)


def test_columns_pidray_adds_must_not_be_there_already():
    schema = SCHEMA.append(pa.field("pidray_status", pa.string()))
    with pytest.raises(BadParameter, match="already has a column 'pidray_status'"):
        pidray.data.upscale(FakeDataset(schema))
    with pytest.raises(BadParameter, match="takes a ray.data.Dataset"):
        pidray.data.upscale([{"image": b"x"}])


def _table() -> pa.Table:
    cells = [{"bytes": PHOTOS["coffee"], "path": "c/coffee.jpg"}, {"bytes": PHOTOS["chelsea"], "path": "cat.png"},
             {"bytes": PHOTOS["gray"], "path": None}, {"bytes": PHOTOS["broken"], "path": "broken.jpg"}, None,
             {"bytes": PHOTOS["coffee"], "path": "small.jpg"}]  # fmt: skip
    return pa.table({"id": ["coffee", "cat", "gray", "broken", "null", "skipped"], "image": pa.array(cells, IMAGE),
                     "text": ["a cup of coffee", "a cat", None, "half", None, "x"], "width": [96, 72, 80, 96, 0, 10],
                     "tags": [["a"], [], None, ["b"], ["c"], []]})  # fmt: skip


@pytest.mark.slow
def test_read_filter_upscale_write_in_a_users_pipeline(ray_local, bicubic_weights, tmp_path):
    ray = ray_local
    pq.write_table(_table(), tmp_path / "in.parquet", row_group_size=2)
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(str(tmp_path / "in.parquet"))
    ds = ds.filter(lambda row: row["width"] != 10)
    ds = pidray.data.upscale(ds, preset="small", image_column="image", caption_column="text", key_column="id",
                             weights=bicubic_weights, device="cpu", format="png")  # fmt: skip
    ds.write_parquet(str(tmp_path / "out"))
    seconds = time.perf_counter() - t0
    out = pq.read_table(tmp_path / "out")
    rows = {r["id"]: r for r in out.to_pylist()}
    assert set(rows) == {"coffee", "cat", "gray", "broken", "null"}
    expect = {"coffee": (384, 384, "RGB", "c/coffee.png"), "cat": (288, 288, "RGB", "cat.png"),
              "gray": (320, 320, "L", None)}  # fmt: skip
    for key, (w, h, mode, path) in expect.items():
        r = rows[key]
        assert (r["pidray_status"], r["pidray_error"]) == ("ok", None), r["pidray_error"]
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert (img.size, img.mode, img.format, r["image"]["path"]) == ((w, h), mode, "PNG", path)
    assert rows["broken"]["pidray_status"] == "failed" and rows["broken"]["image"] is None
    assert rows["broken"]["pidray_error"].startswith("decode: ")
    assert rows["null"]["pidray_status"] == "failed" and "null" in rows["null"]["pidray_error"]
    src = {r["id"]: r for r in _table().to_pylist()}
    for key, r in rows.items():  # every other column as it was
        assert (r["text"], r["width"], r["tags"]) == (src[key]["text"], src[key]["width"], src[key]["tags"])
    assert out.schema.names == ["id", "image", "text", "width", "tags", "pidray_status", "pidray_error"]
    assert out.schema.field("image").type == IMAGE
    print(f"read -> filter -> upscale -> write of 5 rows: {seconds:.1f} s")


# ------------------------------------------------------------------ pidray.data.decode: a column of latent files
LATENTS = pa.schema([("id", pa.string()), ("latent", pa.binary()), ("text", pa.string()), ("sigma", pa.float64())])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"latent_column": "z"}, BadParameter, "no column 'z'; its columns are: id, latent, text, sigma"),
        ({"sigma_column": "text"}, BadInput, "sigma column 'text' of the dataset is string, not a number"),
        ({"sigma_column": "s"}, BadParameter, "no column 's'"),
        ({"latent_format": "sdxl"}, Exception, "does not fit preset"),
        ({"latent_format": "nope"}, BadParameter, "unknown latent format 'nope'"),
        ({"preset": "small"}, BadParameter, "has no latent decoder"),
        ({"steps": 9}, BadParameter, "steps"),
    ],
)  # fmt: skip
def test_decode_arguments_are_checked_before_anything_runs(kwargs, error, match):
    kwargs = {"preset": "flux-2k", **kwargs}
    with pytest.raises(error, match=match) as e:
        pidray.data.decode(FakeDataset(LATENTS), **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_decode_a_latent_column_in_a_users_pipeline(ray_local, golden_dir, tmp_path):
    """Latent files (safetensors, npy, a captured x_t with its sigma, garbage, a null) in a Parquet table through
    read_parquet -> pidray.data.decode -> write_parquet: each decoded image is the one `pidray decode`'s graph makes
    of that file (same key, caption and sigma); bad cells fail alone with their reason."""
    import numpy as np
    import torch
    from safetensors.torch import save as st_save
    from test_encoders import build_stand_in

    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions
    from pipeline.stages import UpscaleOptions

    ray = ray_local
    build_stand_in("flux-2k", golden_dir, tmp_path / "flux")
    model = ModelOptions(str(tmp_path / "flux" / "preset.json"), weights=str(tmp_path / "flux"))
    z = [torch.randn(16, 4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    npy = io.BytesIO()
    np.save(npy, z[1].numpy())
    cells = {"a": st_save({"z": z[0]}), "b": npy.getvalue(), "c": st_save({"z": z[2]}), "junk": b"not a latent",
             "null": None}  # fmt: skip
    table = pa.table({"id": list(cells), "latent": pa.array(list(cells.values()), pa.binary()),
                      "text": ["a cat", None, "a dog", "x", "y"], "sigma": [None, None, 0.5, None, None]})  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    ds = pidray.data.decode(ray.data.read_parquet(str(tmp_path / "in.parquet")), str(model.preset),
                            caption_column="text", key_column="id", sigma_column="sigma", weights=model.weights,
                            device="cpu", seed=3, overlap=1)  # fmt: skip
    ds.write_parquet(str(tmp_path / "out"))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert set(rows) == set(cells)
    local = StageGraph(model, UpscaleOptions(seed=3, overlap=1), "decode")
    ext = {"a": ".safetensors", "b": ".npy", "c": ".safetensors"}
    for key in ("a", "b", "c"):
        r = rows[key]
        assert (r["pidray_status"], r["pidray_error"]) == ("ok", None), r["pidray_error"]
        src = {"key": key + ext[key], "bytes": cells[key]}
        src.update({"caption": t} if (t := table["text"][list(cells).index(key)].as_py()) else {})
        src.update({"sigma": 0.5} if key == "c" else {})
        (ref,) = local.run_local([src])
        assert ref["status"] == "ok", ref.get("error")
        got = np.asarray(Image.open(io.BytesIO(r["latent"])).convert("RGB"))
        assert got.shape == (128, 96, 3)
        assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(ref["output"])).convert("RGB")))
    assert rows["junk"]["pidray_status"] == "failed" and "not a latent file" in rows["junk"]["pidray_error"]
    assert rows["null"]["pidray_status"] == "failed" and "no latent" in rows["null"]["pidray_error"]
    assert rows["a"]["text"] == "a cat" and rows["c"]["sigma"] == 0.5
