"""A corpus of bad and unusual inputs, shared by the batch-job and endpoint tests.

Each entry: name -> (file bytes, expectation). Expectation is either ("ok", (out_w, out_h), output mode or None)
or ("fail", regex the error must match).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 128)], -1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _png_header_only(w, h) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb's calling card) with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def build() -> dict[str, tuple[bytes, tuple]]:
    c: dict[str, tuple[bytes, tuple]] = {}
    jpeg = _save(Image.fromarray(_rgb(40, 60)), "JPEG", quality=90)
    png = _save(Image.fromarray(_rgb(40, 60)), "PNG")
    c["bad/zero bytes.png"] = (b"", ("fail", "empty file"))
    c["bad/truncated.jpg"] = (jpeg[: len(jpeg) // 2], ("fail", "truncated|corrupt"))
    c["bad/truncated.png"] = (png[: len(png) // 3], ("fail", "truncated|corrupt|unreadable"))
    c["bad/not an image.png"] = (b"this is a text file, not a picture\n" * 4, ("fail", "not an image"))
    c["bad/html.jpg"] = (b"<!doctype html><html><body>404</body></html>", ("fail", "not an image"))
    c["bad/bomb.png"] = (_save(Image.new("1", (12000, 12000)), "PNG"), ("fail", "over the limit of"))
    c["bad/header bomb.png"] = (_png_header_only(100000, 100000), ("fail", "over the limit of"))
    c["bad/too long.png"] = (_save(Image.new("RGB", (4100, 2)), "PNG"), ("fail", "16384"))
    cmyk = Image.new("CMYK", (30, 20), (0, 255, 255, 0))
    c["odd/cmyk.jpg"] = (_save(cmyk, "JPEG"), ("ok", (120, 80), "RGB"))
    p = Image.new("P", (20, 12), 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(0, (0, 0, 10, 12))
    c["odd/palette transparent.png"] = (_save(p, "PNG", transparency=0), ("ok", (80, 48), "RGBA"))
    c["odd/gray16.png"] = (_save(Image.fromarray(np.tile(np.linspace(0, 65535, 24), (16, 1)).astype(np.uint16)), "PNG"),
                           ("ok", (96, 64), "I;16"))  # fmt: skip
    c["odd/gray.png"] = (_save(Image.fromarray(_rgb(18, 22)[..., 0]), "PNG"), ("ok", (88, 72), "L"))
    c["odd/bilevel.png"] = (_save(Image.new("1", (17, 9), 1), "PNG"), ("ok", (68, 36), "L"))
    rgba = np.dstack([_rgb(20, 30), np.tile(np.linspace(0, 255, 30), (20, 1)).astype(np.uint8)])
    c["odd/alpha.png"] = (_save(Image.fromarray(rgba), "PNG"), ("ok", (120, 80), "RGBA"))
    la = Image.merge("LA", [Image.fromarray(_rgb(10, 14)[..., 1]), Image.new("L", (14, 10), 100)])
    c["odd/gray alpha.png"] = (_save(la, "PNG"), ("ok", (56, 40), "LA"))
    exif = Image.Exif()
    exif[0x0112] = 6
    c["odd/exif rotated.jpg"] = (
        _save(Image.fromarray(_rgb(20, 36)), "JPEG", exif=exif.tobytes()),
        ("ok", (80, 144), "RGB"),
    )
    frames = [Image.fromarray(_rgb(12, 16, s)) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    c["odd/animated.gif"] = (buf.getvalue(), ("ok", (64, 48), None))
    c["odd/one pixel.png"] = (_save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), ("ok", (4, 4), "RGB"))
    c["odd/tall thin 2x700.png"] = (_save(Image.fromarray(_rgb(700, 2)), "PNG"), ("ok", (8, 2800), "RGB"))
    c["odd/wide 700x2.png"] = (_save(Image.fromarray(_rgb(2, 700)), "PNG"), ("ok", (2800, 8), "RGB"))
    c["odd/image.webp"] = (_save(Image.fromarray(_rgb(16, 24)), "WEBP"), ("ok", (96, 64), "RGB"))
    c["odd/image.tiff"] = (_save(Image.fromarray(_rgb(16, 24)), "TIFF"), ("ok", (96, 64), "RGB"))
    c["odd/image.bmp"] = (_save(Image.fromarray(_rgb(16, 24)), "BMP"), ("ok", (96, 64), "RGB"))
    c["odd/odd size 33x47.jpg"] = (_save(Image.fromarray(_rgb(33, 47)), "JPEG"), ("ok", (188, 132), "RGB"))
    c["odd/jpeg named png.png"] = (jpeg, ("ok", (240, 160), "RGB"))
    c["odd/float.tiff"] = (_save(Image.fromarray(np.linspace(0, 1, 96, dtype=np.float32).reshape(8, 12)), "TIFF"),
                           ("ok", (48, 32), None))  # fmt: skip
    c["nested/deeper/ünïcode ✓ name.png"] = (_save(Image.fromarray(_rgb(12, 12)), "PNG"), ("ok", (48, 48), "RGB"))
    return c
