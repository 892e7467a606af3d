"""Synthetic image files for tests and benchmarks: smooth random pictures saved as real JPEGs.

They compress and decode like photographs (a few blurred colour blobs plus mild noise), so the
cache's decoding speed measured on them is representative, and nothing has to be downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def smooth_image(
    rng: np.random.Generator, width: int, height: int, mode: str = "RGB"
) -> Image.Image:
    """A blurred random picture of the given size."""
    coarse = rng.integers(0, 256, (max(height // 24, 2), max(width // 24, 2), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    img = img.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).convert(mode)


def write_images(
    folder: str | Path,
    names: Iterable[str],
    size: tuple[int, int] = (178, 218),
    seed: int = 0,
    quality: int = 90,
) -> list[Path]:
    """Write one picture per name (format from the extension) under ``folder``; (width, height)."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = smooth_image(rng, *size)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            img.save(path, quality=quality)
        else:
            img.save(path)
        paths.append(path)
    return paths


def celeba_name(number: int) -> str:
    """CelebA's file name for an image number: 1 -> '000001.jpg'."""
    return f"{number:06d}.jpg"
