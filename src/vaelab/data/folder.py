"""``folder``: every image under data.root, recursively, centre-cropped and resized.

The train/val split hashes each file's path relative to the root, so adding files never moves
old ones from one split to the other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from vaelab.config import DataConfig
from vaelab.data import cache
from vaelab.data.base import DataError, ImageDataset, Splits, log
from vaelab.data.images import EXTENSIONS

DEFAULT_SIZE = 64


def require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"data.name={cfg.name} needs data.root=PATH (the folder of its files)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder")
    return root


def image_files(folder: Path, recursive: bool = True) -> list[str]:
    """Sorted paths (relative to ``folder``, '/'-separated) of files with an image extension."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p.relative_to(folder).as_posix()
        for p in found
        if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def hash_fraction(name: str) -> float:
    """A stable number in [0, 1) from a relative path (the first 8 bytes of its SHA-1)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


def hash_split(names: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) by hashing names; at least one validation image when n >= 2."""
    fractions = np.array([hash_fraction(n) for n in names])
    is_val = fractions < val_fraction
    if not is_val.any() and len(names) >= 2:
        is_val[np.argmin(fractions)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    root = require_root(cfg)
    files = image_files(root)
    if not files:
        raise DataError(
            f"data.root '{root}': no image files ({', '.join(EXTENSIONS)}) in it or below it"
        )
    size, channels = cfg.size or DEFAULT_SIZE, cfg.channels or 3
    images, manifest = cache.prepare("folder", root, files, cfg, size, cfg.crop, channels, progress)
    train_idx, val_idx = hash_split(manifest["images"], cfg.val_fraction)
    if len(val_idx) == 0:
        raise DataError(f"data.root '{root}': one usable image is too few to split train/val")
    log.info(f"folder {root}: {len(train_idx)} train, {len(val_idx)} val images")
    full = ImageDataset(images)
    return Splits(full.subset(train_idx), full.subset(val_idx), info=manifest)
