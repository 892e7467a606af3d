"""Decoding one image file into a square uint8 array: open, turn upright, centre-crop, resize.

Images are turned upright as their EXIF orientation tag says, and 16-bit grey PNGs are scaled
to 8 bits. JPEGs are decoded with Pillow's draft mode, which lets libjpeg scale by 1/2, 1/4 or
1/8 during the inverse DCT: a 178x218 CelebA face cropped to 148 and resized to 64 decodes at
half size, about twice as fast, with no visible loss (the antialiased resize that follows does
the rest).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What a broken file raises while opening or decoding: unidentifiable or truncated images are
# OSErrors; a few corrupt headers surface as ValueError, SyntaxError or struct errors.
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
ORIENTATION = 0x0112  # the EXIF tag: how the stored pixels must be turned to be seen upright
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the image by a quarter
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")  # Pillow's modes of 16-bit grey


def crop_box(width: int, height: int, crop: int) -> tuple[float, float, float, float]:
    """The centre square of side ``crop`` (0: the short side; clipped to it)."""
    side = min(width, height) if crop <= 0 else min(crop, width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def orientation(img: Image.Image) -> int:
    """The image's EXIF orientation, 1 (stored upright) to 8; 1 where absent or unreadable."""
    if img.format == "JPEG" and "exif" not in img.info:
        return 1  # no EXIF block (CelebA's JFIF files): nothing to parse
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except (*DECODE_ERRORS, KeyError, IndexError, TypeError):
        return 1  # a broken EXIF block: the pixels are still good, shown as stored
    return value if isinstance(value, int) and value in TRANSPOSE else 1


def _to_mode(img: Image.Image, channels: int, fmt: str | None) -> Image.Image:
    """Grey, RGB, RGBA or palette -> 'L' or 'RGB'; transparency is composited onto white.

    16-bit grey (Pillow's 'I;16' modes, or 'I' from a PNG) is scaled to 8 bits (value / 257,
    rounded): convert('L') would clip every value above 255 to white. 16-bit colour PNGs
    already arrive as 8-bit 'RGB'/'RGBA' (Pillow keeps the high byte).
    """
    if img.mode in SIXTEEN_BIT or (img.mode == "I" and fmt == "PNG"):
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray(((wide.clip(0, 65535) + 128) // 257).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def load_image(path: str | Path, size: int, crop: int, channels: int) -> np.ndarray:
    """(size, size, channels) uint8 from an image file; raises one of DECODE_ERRORS if broken.

    The image is turned upright first as its EXIF orientation says (phone photos are stored
    sideways with a tag), so the centre crop is the centre of the picture as it is seen.
    """
    with Image.open(path) as img:
        turn = orientation(img)
        fmt, (width, height) = img.format, img.size
        upright = (height, width) if turn in SWAPS_SIDES else (width, height)
        box = crop_box(*upright, crop)  # in the upright picture's coordinates
        if fmt == "JPEG":
            side = box[2] - box[0]
            need = (math.ceil(width * size / side), math.ceil(height * size / side))
            img.draft("L" if channels == 1 else "RGB", need)  # DCT scaling, never below need
            # libjpeg scales by exactly 1/1, 1/2, 1/4 or 1/8 and rounds the size up, so the
            # factor is the ratio rounded, not the ratio of sizes (45/178 is 1/4, not 0.253).
            # The same factor scales both sides, so the upright box scales with it.
            scale = 1.0 / round(width / img.size[0])
            box = tuple(v * scale for v in box)  # type: ignore[assignment]
        img = _to_mode(img, channels, fmt)
        if turn != 1:
            img = img.transpose(TRANSPOSE[turn])
        out = img.resize((size, size), Image.Resampling.LANCZOS, box=box)
        return np.asarray(out, dtype=np.uint8).reshape(size, size, channels)


def decode_job(job: tuple[str, int, int, int]) -> tuple[np.ndarray | None, str | None]:
    """For a worker pool: (image, None) on success, (None, reason) for a file to skip."""
    path, size, crop, channels = job
    try:
        return load_image(path, size, crop, channels), None
    except DECODE_ERRORS as err:
        return None, f"{type(err).__name__}: {err}".splitlines()[0][:200]
