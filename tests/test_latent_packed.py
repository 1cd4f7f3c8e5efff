"""`pidray decode --latent-format flux-packed|flux2-packed|qwenimage-packed`: packed sequences (packed here by the
diffusers pipelines' own `_pack_latents`) read back as the latent they pack, laid out by the file's metadata or the
output size; and a one-frame Qwen-Image latent saved as one [C, 1, h, w] tensor read as one latent."""

import io

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as np_save
from test_encoders import stand_in  # noqa: F401

from pipeline.errors import BadInput
from pipeline.graph import StageGraph
from pipeline.latents import Packing, header_ids, read_latents, unpack
from pipeline.stages import UpscaleOptions

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")


def _latent(c, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((c, h, w)).astype(np.float32)


def test_each_packing_unpacks_what_its_pipeline_packs():
    z = _latent(16, 8, 6)
    flux = diffusers.FluxPipeline._pack_latents(torch.from_numpy(z)[None], 1, 16, 8, 6)
    np.testing.assert_array_equal(unpack(flux.numpy(), Packing("flux-packed", image_hw=(64, 48))), z)
    qwen = diffusers.QwenImagePipeline._pack_latents(torch.from_numpy(z)[None], 1, 16, 8, 6)
    np.testing.assert_array_equal(unpack(qwen[0].numpy(), Packing("qwenimage-packed", out_hw=(256, 192))), z)
    z2 = _latent(128, 4, 3)
    flux2 = diffusers.Flux2Pipeline._pack_latents(torch.from_numpy(z2)[None])
    np.testing.assert_array_equal(unpack(flux2.numpy(), Packing("flux2-packed", image_hw=(64, 48))), z2)
    # the output's aspect picks the grid: 12 tokens as 4x3, not 3x4 or 6x2
    np.testing.assert_array_equal(unpack(flux2.numpy(), Packing("flux2-packed", out_hw=(1000, 760))), z2)
    with pytest.raises(BadInput, match="needs its image size"):
        unpack(flux2.numpy(), Packing("flux2-packed"))
    with pytest.raises(BadInput, match="packs into 4x4 = 16 tokens; the latent holds 12"):
        unpack(flux2.numpy(), Packing("flux2-packed", image_hw=(64, 64)))


def test_one_frame_qwenimage_latent_in_one_tensor_is_one_latent():
    """[C, 1, h, w] in one tensor (the shape the docs accept) is one latent, not a batch of C without ids."""
    z = _latent(16, 8, 6)
    data = np_save({"z": z[:, None]})
    assert header_ids("a.safetensors", data) == [""]
    (item,) = read_latents("a.safetensors", data)
    np.testing.assert_array_equal(item.latent, z)
    buf = io.BytesIO()
    np.save(buf, z[:, None])
    (item,) = read_latents("a.npy", buf.getvalue())
    np.testing.assert_array_equal(item.latent, z)
    with pytest.raises(BadInput, match="a batch of 2 latents without ids"):  # a real batch still needs its ids
        header_ids("b.safetensors", np_save({"z": np.zeros((2, 16, 8, 6), np.float32)}))


def _px(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_decode_a_flux_packed_file_is_the_decode_of_its_latent(stand_in):  # noqa: F811
    """The packed file (its size in the metadata, or an output size given) decodes to the same image as the latent
    it packs."""
    opts = stand_in("flux-2k")
    options = UpscaleOptions(overlap=1, seed=2)
    z = _latent(16, 8, 6, seed=4)
    packed = diffusers.FluxPipeline._pack_latents(torch.from_numpy(z)[None], 1, 16, 8, 6).numpy()
    ref_row = {"key": "z.safetensors", "bytes": np_save({"z": z}), "caption": "a cat"}
    (ref,) = list(StageGraph(opts, options, "decode").run_local([ref_row]))
    assert ref["status"] == "ok", ref.get("error")
    meta = {"format": "flux-packed", "height": "64", "width": "48"}
    rows = [{"key": "p.safetensors", "bytes": np_save({"z": packed}, metadata=meta), "caption": "a cat"}]
    (got,) = list(StageGraph(opts, options, "decode").run_local(rows))
    assert got["status"] == "ok", got.get("error")
    assert np.array_equal(_px(got["output"]), _px(ref["output"]))
    (ref,) = list(StageGraph(opts, options, "decode").run_local([{**ref_row, "out_size": [256, 192]}]))
    sized = {"key": "q.safetensors", "bytes": np_save({"z": packed[0]}), "caption": "a cat", "out_size": [256, 192]}
    (got,) = list(StageGraph(opts, options, "decode", latent_format="flux-packed").run_local([sized]))
    assert got["status"] == "ok", got.get("error")
    assert np.array_equal(_px(got["output"]), _px(ref["output"]))
    bare = {"key": "r.safetensors", "bytes": np_save({"z": packed[0]}), "caption": "a cat"}
    (got,) = list(StageGraph(opts, options, "decode", latent_format="flux-packed").run_local([bare]))
    assert got["status"] == "failed" and "needs its image size" in got["error"]
