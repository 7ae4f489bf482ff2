"""Decoding images from untrusted bytes into ``uint8`` RGB ``H x W x 3`` arrays, with hard bounds.

The format is sniffed from the bytes (never the file name), the pixel count is checked from the header before
any pixel is decoded (decompression bombs), truncated files are errors rather than grey bands, EXIF orientation
is applied, and grayscale, palette, CMYK, 16-bit and alpha images become RGB (alpha composited over white, as a
browser shows it).

Truncated JPEGs need a second decoder: when libjpeg meets a marker (say an ``FFD9`` appended to half a file)
before the scan data is complete, it fills the rest with grey and only warns, and PIL drops the warning. So a
JPEG's entropy-coded data is first decoded by libjpeg-turbo through simplejpeg with ``strict=True`` (warnings
are errors), at 1/8 scale and in grey: the whole Huffman stream is read, but the inverse DCT and colour
conversion are mostly skipped (on a 12 MP photo, 45% of the time of PIL's decode for a baseline file, 80%
for a progressive one).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_BYTES = 20 * 1024 * 1024  # 20 MB, the service's default upload limit
MAX_PIXELS = 40_000_000  # about 7,300 x 5,500; enough for camera photos, far below a bomb
MIN_SIDE = 1
STRIP_ROWS = 256  # rows copied at a time from PIL's image into the array (_to_rgb)
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff")

# PIL's own bomb check warns at 89M pixels and raises at twice that; ours is stricter and comes first.
Image.MAX_IMAGE_PIXELS = None
# PIL allocates a large image in blocks of 16 MB, under glibc's largest mmap threshold (32 MB), so freed blocks
# stay in the heap of whichever thread decoded them: a server decoding in several threads kept 1.0 GB after five
# bursts of 6000 x 6000 images. Blocks of 64 MB are mapped and unmapped whole (0.3 GB kept, measured); a small
# image still gets only what it needs.
Image.core.set_block_size(64 * 1024 * 1024)
Image.init()  # register every plugin so that ``formats=`` can name them
_OPEN_FORMATS = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)  # Pillow 13 folds MPO into JPEG


class ImageError(ValueError):
    """An input that is not a usable image; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Decode encoded image bytes into ``uint8`` RGB ``[H, W, 3]``; raises ``ImageError`` on anything else."""
    img = _open(data, max_pixels, max_bytes)
    if img.format in ("JPEG", "MPO"):
        _check_jpeg_scan(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # without in_place it copies even an upright image
    except MemoryError:
        raise
    except Exception as e:  # as for headers, PIL raises assorted errors on bad pixel data (a TIFF whose strip
        # offset is a fraction: TypeError)
        msg = str(e)
        code = "truncated" if "truncated" in msg.lower() or "image file is" in msg else "corrupt"
        raise ImageError(code, f"image data is {'truncated' if code == 'truncated' else 'corrupt'}: {msg}") from None
    return _to_rgb(img)


def image_size(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> tuple[int, int]:
    """``(width, height)`` from the header alone, after ``decode_image``'s checks of bytes, format and pixel
    count: what decoding will allocate, known before any pixel is decoded (the service budgets on it)."""
    return _open(data, max_pixels, max_bytes).size


def _open(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    """The image with its header read and checked, its pixels not yet decoded."""
    if len(data) == 0:
        raise ImageError("empty", "the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"the file has {len(data):,} bytes, more than the limit of {max_bytes:,}")
    try:
        img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a supported image (JPEG, PNG, WebP, BMP or TIFF expected)") from None
    except Exception as e:  # PIL raises assorted errors on garbage headers
        if "truncated" in str(e).lower():
            raise ImageError("truncated", f"image data is truncated: {e}") from None
        raise ImageError("corrupt", f"unreadable image header: {e}") from None
    width, height = img.size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError("corrupt", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError("too_many_pixels",
                         f"image is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}")
    return img


def _check_jpeg_scan(data: bytes) -> None:
    """Raise ``ImageError`` unless libjpeg reads the whole scan data without a warning (see the module's note)."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, strict=True)  # 1/8 scale
    except ValueError as e:
        msg = str(e)
        if "premature end" in msg.lower():
            raise ImageError("truncated", f"image data is truncated: {msg}") from None
        raise ImageError("corrupt", f"image data is corrupt: {msg}") from None


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / max(1.0, float(arr.max()) if img.mode == "I" else 65535.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":  # CMYK, YCbCr, L, 1 all convert here (convert("RGB") of an RGB image would copy it)
        img = img.convert("RGB")
    # A writable copy, made in strips: np.array(img) would hold PIL's tobytes() and the array at once, 6 bytes
    # per pixel on top of PIL's 4 (measured: 216 MB more at the peak for 6000 x 6000, 108 MB this way).
    width, height = img.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, STRIP_ROWS):
        bottom = min(height, top + STRIP_ROWS)
        out[top:bottom] = np.asarray(img.crop((0, top, width, bottom)))
    return out


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Read and decode a file; the size limit is checked before the file is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("not_found", f"no such file: {path}") from None
    if not path.is_file():
        raise ImageError("not_a_file", f"not a regular file: {path}")
    if size > max_bytes:
        raise ImageError("too_large", f"the file has {size:,} bytes, more than the limit of {max_bytes:,}")
    return decode_image(path.read_bytes(), max_pixels=max_pixels, max_bytes=max_bytes)


def list_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively, image suffixes only, sorted) in the given order.

    A file named explicitly is kept whatever its suffix, so that a bad file gets its own error line.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out
