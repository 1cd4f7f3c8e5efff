"""Decode/encode faithful to the input: modes, alpha, 16-bit, EXIF orientation, ICC, formats, bad files.

Runs the whole stage graph in-process with the `small` preset at its bicubic initialisation.
"""

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from pipeline.graph import StageGraph
from pipeline.imageio import ImageError, TooLarge, decode
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions

from conftest import png_bytes


@pytest.fixture(scope="module")
def run(bicubic_weights):
    graph = StageGraph(ModelOptions(weights=bicubic_weights), UpscaleOptions())
    stages = graph.build_all()

    def go(data, **row):
        return next(graph.run_local([{"key": "k", "bytes": data, **row}], stages))

    return go


def _open(row):
    assert row.get("status") == "ok", row.get("error")
    return Image.open(io.BytesIO(row["output"]))


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 255 // max(1, h + w - 2)], -1)


@pytest.mark.parametrize("hw", [(1, 1), (2, 700), (45, 71), (33, 32)])
def test_exact_output_size(run, hw):
    img = Image.fromarray(_gradient(*hw).astype(np.uint8))
    out = _open(run(png_bytes(img)))
    assert out.size == (hw[1] * 4, hw[0] * 4)


def test_content_follows_input(run):
    arr = _gradient(40, 60).astype(np.uint8)
    out = np.asarray(_open(run(png_bytes(Image.fromarray(arr)))).convert("RGB")).astype(float)
    ref = np.asarray(Image.fromarray(arr).resize((240, 160), Image.BICUBIC)).astype(float)
    assert np.abs(out - ref)[8:-8, 8:-8].mean() < 3.0


def test_rgba_alpha_is_upscaled_and_reattached(run):
    arr = np.dstack([_gradient(20, 30), np.tile(np.linspace(0, 255, 30), (20, 1))]).astype(np.uint8)
    out = _open(run(png_bytes(Image.fromarray(arr, "RGBA"))))
    assert out.mode == "RGBA" and out.size == (120, 80)
    alpha = np.asarray(out.getchannel("A")).astype(int)
    assert alpha[:, :8].mean() < 30 and alpha[:, -8:].mean() > 225


def test_grayscale_and_la_stay_grayscale(run):
    g = Image.fromarray(_gradient(16, 24)[..., 0].astype(np.uint8), "L")
    assert _open(run(png_bytes(g))).mode == "L"
    la = Image.merge("LA", [g, Image.new("L", g.size, 128)])
    out = _open(run(png_bytes(la)))
    assert out.mode == "LA" and abs(np.asarray(out.getchannel("A")).mean() - 128) < 2


def test_16bit_grayscale_stays_16bit(run):
    arr = (np.tile(np.linspace(0, 65535, 24), (16, 1))).astype(np.uint16)
    img = Image.fromarray(arr)
    out = _open(run(png_bytes(img)))
    assert out.mode in ("I;16", "I") and out.size == (96, 64)
    vals = np.asarray(out).astype(int)
    assert vals.max() > 60000 and (vals % 257 != 0).mean() > 0.5  # not 8-bit levels scaled up


def test_palette_with_transparency(run):
    p = Image.new("P", (20, 12), 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(0, (0, 0, 10, 12))
    out = _open(run(png_bytes(p, transparency=0)))
    assert out.mode == "RGBA" and np.asarray(out.getchannel("A"))[:, :30].mean() < 20


def test_cmyk_jpeg_becomes_rgb_jpeg_with_note(run):
    cmyk = Image.new("CMYK", (24, 16), (0, 255, 255, 0))  # red
    row = run(png_bytes(cmyk, "JPEG"))
    out = _open(row)
    assert out.format == "JPEG" and out.mode == "RGB" and any("CMYK" in n for n in row["notes"])
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_applied_and_reset(run):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: red ends up on top
    out = _open(run(png_bytes(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)))
    assert out.size == (80, 160)
    top, bottom = np.asarray(out)[:60].mean((0, 1)), np.asarray(out)[-60:].mean((0, 1))
    assert top[0] > 200 and bottom[0] < 60
    assert out.getexif().get(0x0112, 1) == 1


def test_icc_profile_is_carried(run):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = _open(run(png_bytes(Image.fromarray(_gradient(8, 8).astype(np.uint8)), icc_profile=icc)))
    assert out.info.get("icc_profile") == icc


@pytest.mark.parametrize("fmt,expect", [("WEBP", "WEBP"), ("TIFF", "TIFF"), ("BMP", "PNG"), ("GIF", "PNG")])
def test_formats(run, fmt, expect):
    img = Image.fromarray(_gradient(12, 16).astype(np.uint8))
    assert _open(run(png_bytes(img, fmt))).format == expect


def test_animated_gif_first_frame_with_note(run):
    frames = [Image.new("RGB", (16, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    row = run(buf.getvalue())
    out = _open(row)
    assert out.size == (64, 32) and any("first frame" in n for n in row["notes"])
    assert np.asarray(out.convert("RGB"))[..., 0].mean() > 200  # the red first frame


def test_requested_format_and_scale(run):
    img = Image.fromarray(_gradient(20, 30).astype(np.uint8))
    out = _open(run(png_bytes(img), format="jpeg", scale=2))
    assert out.format == "JPEG" and out.size == (60, 40)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image"),
        (png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:60], "corrupt or truncated|unreadable"),
    ],
)
def test_bad_files_fail_with_a_reason(run, data, reason):
    row = run(data)
    assert row["status"] == "failed" and "output" not in row
    assert pytest.importorskip("re").search(reason, row["error"]), row["error"]


def test_decompression_bomb_refused_before_decoding():
    bomb = png_bytes(Image.new("1", (12000, 12000)))
    assert len(bomb) < 1_000_000
    with pytest.raises(TooLarge, match="144,000,000 pixels, over the limit of 64,000,000"):
        decode(bomb)
    with pytest.raises(ImageError):
        decode(bomb, max_pixels=10)


def test_too_large_output_fails_up_front(run):
    from pipeline.model.presets import get_preset
    from pipeline.stages.encode import plan_for

    with pytest.raises(TooLarge, match="over the limit of 16384"):
        plan_for(get_preset("small"), UpscaleOptions(), (4100, 10))
    row = run(png_bytes(Image.new("RGB", (4100, 2))))
    assert row["status"] == "failed" and "16384" in row["error"] and "output" not in row


def test_a_transparent_image_written_without_alpha_is_flattened_onto_the_background():
    """What transparent pixels hide never shows in a JPEG: they come out as the background (white by default), and
    half-transparent ones as the blend an editor's flatten gives."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.imageio import decode, encode
    from pipeline.options import parse_color

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (250, 0, 0)  # red under full transparency on the left, half on the right
    rgba[:, 4:, 3] = 128
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    src = decode(buf.getvalue())
    for bg, expect_left in (("white", (255, 255, 255)), ("#202020", (32, 32, 32))):
        out = np.asarray(Image.open(io.BytesIO(encode(src.rgb, src, "JPEG", quality=100, alpha=src.alpha,
                                                      background=parse_color(bg)))).convert("RGB"), float)  # fmt: skip
        assert np.abs(out[:, :2] - expect_left).max() < 6, (bg, out[0, 0])
        half = np.array([250, 0, 0]) * 128 / 255 + np.array(expect_left) * (1 - 128 / 255)
        assert np.abs(out[:, 6:] - half).max() < 8, (bg, out[0, 7], half)
    png = Image.open(io.BytesIO(encode(src.rgb, src, "PNG", alpha=src.alpha)))
    assert png.mode == "RGBA" and np.asarray(png)[0, 0, 0] == 250  # a format with alpha keeps everything
