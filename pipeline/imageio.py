"""Image decode/encode with Pillow, faithful to the input file.

decode: EXIF orientation applied; every common mode turned into RGB samples (uint8, or uint16 for
16-bit grayscale) plus a separate alpha plane; ICC profile and EXIF kept (orientation reset) for
the output; a pixel limit checked *before* decoding, so a decompression bomb is refused cleanly.
encode: the upscaled RGB back to the input's mode (L, LA, RGBA, 16-bit gray), alpha re-attached,
format/quality chosen, metadata carried over.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import BadInput, BadParameter
from pipeline.errors import TooLarge as _TooLarge
from pipeline.options import DEFAULT_MAX_PIXELS  # input pixels; configurable per job / endpoint

Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit with a clear error instead of Pillow's warning

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", "tif": "TIFF", "bmp": "BMP"}
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "TIFF": "image/tiff",
                 "BMP": "image/bmp"}  # fmt: skip
ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}
# TIFF baseline tags about strip layout, sample format and compression (Pillow reports them as EXIF).
_TIFF_STRUCTURE = (254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 317, 320, 322,
                   323, 324, 325, 338, 339, 340, 341, 530, 531, 532)  # fmt: skip


class ImageError(BadInput):
    """A file that cannot be upscaled; the message says why (shown to users, recorded in manifests)."""


class TooLarge(ImageError, _TooLarge):
    """Over a pixel or size limit (kind `too_large`)."""


@dataclass
class Decoded:
    rgb: np.ndarray  # [H, W, 3] uint8, or uint16 for 16-bit sources
    alpha: np.ndarray | None  # [H, W] same dtype as rgb, or None
    mode: str  # original Pillow mode
    format: str  # original format (PNG, JPEG, ...)
    gray: bool  # source had no colour: output is grayscale again
    icc: bytes | None = None
    exif: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def bits(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8

    def to_float(self) -> np.ndarray:
        """[3, H, W] float32 in [-1, 1]."""
        peak = 65535.0 if self.bits == 16 else 255.0
        return (self.rgb.astype(np.float32).transpose(2, 0, 1) / peak) * 2.0 - 1.0


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count before any pixel is decoded."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Exception as e:  # Pillow raises many types on garbage headers
        raise ImageError(f"unreadable image header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise TooLarge(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (decompression bomb?)")
    return img


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after EXIF orientation, read from the header alone (cheap: nothing is decoded)."""
    img = _open(data, max_pixels)
    w, h = img.size
    try:
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # transposed orientations swap the sides
            w, h = h, w
    except Exception:  # a broken EXIF block does not change the header's size
        pass
    return h, w


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    img = _open(data, max_pixels)
    fmt = img.format or "PNG"
    notes = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated/multi-frame {fmt} with {frames} frames: only the first frame is upscaled")
    try:
        img.seek(0)
        img.load()
        exif = img.getexif()
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # Pillow raises many types on corrupt or truncated pixel data
        raise ImageError(f"corrupt or truncated image data: {e}") from None
    icc = img.info.get("icc_profile")
    if exif is not None:
        for tag in _TIFF_STRUCTURE:  # a TIFF's own layout tags describe the source file, not the output
            exif.pop(tag, None)
        if 0x0112 in exif:
            exif[0x0112] = 1  # orientation applied to the pixels: reset the tag
    exif_bytes = exif.tobytes() if exif is not None and len(exif) else None
    return _to_samples(img, fmt, icc, exif_bytes, notes)


def _to_samples(img: Image.Image, fmt: str, icc, exif, notes) -> Decoded:
    mode = img.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 1.0 if arr.max() <= 1.0 else 65535.0)
            arr = arr * 65535.0 if arr.max() <= 1.0 else arr
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
        return Decoded(np.repeat(arr[..., None], 3, axis=2), None, mode, fmt, True, icc, exif, notes)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "CMYK":
        img = img.convert("RGB")
        notes.append("CMYK converted to RGB; the output is RGB")
        icc = None  # a CMYK profile no longer describes the pixels
    elif mode in ("PA", "La"):
        img = img.convert("LA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in mode else "RGB")
    gray = img.mode in ("L", "LA")
    if img.mode in ("LA", "RGBA"):
        alpha = np.asarray(img.getchannel("A")).copy()  # kept even when fully opaque: the output keeps the mode
    rgb = np.asarray(img.convert("RGB")).copy()
    return Decoded(rgb, alpha, mode, fmt, gray, icc, exif, notes)


def resize_plane(plane: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Lanczos resize of one uint8/uint16 plane (used for alpha, and for non-native scales)."""
    h, w = size_hw
    if plane.dtype == np.uint16:
        out = Image.fromarray(plane.astype(np.float32)).resize((w, h), Image.LANCZOS)
        return np.clip(np.asarray(out), 0, 65535).round().astype(np.uint16)
    return np.asarray(Image.fromarray(plane).resize((w, h), Image.LANCZOS))


def quantize(x, bits: int) -> np.ndarray:
    """[3, H, W] float tensor in [-1, 1] (any device) -> [H, W, 3] uint8/uint16 on the host.

    Quantised where the tensor lives, so only the compact result crosses to the host (1 or 2 bytes a sample).
    """
    peak = 65535.0 if bits == 16 else 255.0
    v = (((x.float() + 1.0) * 0.5).clamp(0.0, 1.0) * peak).round().permute(1, 2, 0)
    if bits == 16:
        return v.to(torch.int32).cpu().numpy().astype(np.uint16)
    return v.to(torch.uint8).contiguous().cpu().numpy()


def output_format(src: Decoded, requested: str | None) -> str:
    """The requested format, else the input's (PNG when the input has alpha and its format cannot carry it)."""
    if requested:
        key = requested.lower().lstrip(".")
        if key not in FORMATS:
            raise BadParameter(f"unknown output format {requested!r}; choose one of {sorted(set(FORMATS))}")
        return FORMATS[key]
    fmt = src.format.upper()
    if fmt in ("GIF", "BMP", "MPO") or fmt not in CONTENT_TYPES:
        return "PNG"
    if src.alpha is not None and fmt not in ALPHA_FORMATS:
        return "PNG"
    if src.bits == 16 and fmt not in ("PNG", "TIFF"):
        return "PNG"
    return fmt


def flatten(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """rgb over `background` by `alpha` (same dtype as rgb: uint8 or uint16), rounded to rgb's dtype."""
    top = 65535.0 if rgb.dtype == np.uint16 else 255.0
    a = alpha.astype(np.float32)[..., None] / top
    bg = np.asarray(background, np.float32) * (top / 255.0)
    out = rgb.astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(np.rint(out), 0, top).astype(rgb.dtype)


def encode(rgb: np.ndarray, src: Decoded, fmt: str, *, quality: int = 95, alpha: np.ndarray | None = None,
           background: tuple[int, int, int] = (255, 255, 255)) -> bytes:  # fmt: skip
    """rgb [H, W, 3] uint8/uint16 (already at output size) -> file bytes in the source's mode where fmt allows. A
    format without alpha gets the image flattened onto `background` (as an editor flattens it): what was hidden under
    transparent pixels never shows."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if alpha is not None and fmt not in ALPHA_FORMATS:
        rgb, alpha = flatten(rgb, alpha, background), None
    sixteen = rgb.dtype == np.uint16
    if sixteen and fmt in ("PNG", "TIFF"):
        luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        img = Image.fromarray(np.clip(luma.round(), 0, 65535).astype(np.uint16))  # 16-bit stays 16-bit
    else:
        if sixteen:
            rgb = (rgb.astype(np.uint32) * 255 // 65535).astype(np.uint8)
            alpha = None if alpha is None else (alpha.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        img = Image.fromarray(rgb)
        if src.gray:
            img = img.convert("L")
        if alpha is not None and fmt in ALPHA_FORMATS:
            img.putalpha(Image.fromarray(alpha))
    kw = {}
    if src.icc and not sixteen:
        kw["icc_profile"] = src.icc
    if src.exif and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        kw["exif"] = src.exif
    if fmt in ("JPEG", "WEBP"):
        kw["quality"] = quality
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()
