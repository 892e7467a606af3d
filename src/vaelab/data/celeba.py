"""``celeba``: CelebA's aligned faces from a local folder (users download CelebA themselves).

Accepted layouts under data.root (DESIGN.md gives the file formats):
  official:     ROOT/img_align_celeba/000001.jpg ..., ROOT/list_eval_partition.txt
  torchvision:  ROOT/celeba/img_align_celeba/..., ROOT/celeba/list_eval_partition.txt
  (and either with the images one folder deeper, img_align_celeba/img_align_celeba/, as the
  popular re-uploads unpack.) Optional: list_attr_celeba.txt, identity_CelebA.txt.

Having only part of the images is normal: training uses the ones present and says how many the
partition file listed that are missing. With no partition file the official split by file number
is used (1-162770 train, 162771-182637 valid, 182638-202599 test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vaelab.config import DataConfig
from vaelab.data import cache
from vaelab.data.base import DataError, ImageDataset, Splits, log
from vaelab.data.folder import hash_split, image_files, require_root

DEFAULT_SIZE, DEFAULT_CROP = 64, 148
PARTITION = "list_eval_partition.txt"
ATTRIBUTES = "list_attr_celeba.txt"
IDENTITIES = "identity_CelebA.txt"
# Official split by file number: the last number of train and of valid.
LAST_TRAIN, LAST_VALID = 162770, 182637
SPLIT_NAMES = ("train", "valid", "test")


def find_layout(root: Path) -> tuple[Path, Path]:
    """(folder with the metadata files, folder with the images)."""
    for base in (root, root / "celeba"):
        images = base / "img_align_celeba"
        if images.is_dir():
            nested = images / "img_align_celeba"
            return base, nested if nested.is_dir() else images
    raise DataError(
        f"data.root '{root}': expected CelebA's official layout ({root}/img_align_celeba/*.jpg"
        f" with {root}/{PARTITION}) or torchvision's ({root}/celeba/img_align_celeba/*.jpg)"
    )


def _read_table(path: Path, columns: int | None) -> list[list[str]]:
    """Whitespace-separated rows; ``columns`` (if given) checked on every row."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if columns is not None and len(parts) != columns:
            raise DataError(f"'{path}' line {n}: expected {columns} fields, got {len(parts)}")
        rows.append(parts)
    return rows


def read_partition(path: Path) -> dict[str, int]:
    """file name -> 0 (train), 1 (valid) or 2 (test)."""
    out = {}
    for name, split in _read_table(path, 2):
        if split not in ("0", "1", "2"):
            raise DataError(f"'{path}': split of {name} must be 0, 1 or 2, got '{split}'")
        out[name] = int(split)
    return out


def split_by_number(name: str) -> int | None:
    """The official split of an image from its file number, or None for another name."""
    stem = Path(name).stem
    if not stem.isdigit():
        return None
    n = int(stem)
    return 0 if n <= LAST_TRAIN else 1 if n <= LAST_VALID else 2


def read_attributes(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Attribute name -> (len(names),) int8 of -1/1 (0 where an image has no row)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise DataError(f"'{path}': expected a count line, a line of attribute names, then rows")
    header = lines[1].split()
    table = {}
    for n, line in enumerate(lines[2:], 3):
        parts = line.split()
        if len(parts) != len(header) + 1:
            raise DataError(f"'{path}' line {n}: expected {len(header) + 1} fields")
        table[parts[0]] = parts[1:]
    values = np.zeros((len(names), len(header)), np.int8)
    for i, name in enumerate(names):
        if name in table:
            values[i] = np.array(table[name], dtype=np.int8)
    return {attr: values[:, j] for j, attr in enumerate(header)}


def read_identities(path: Path, names: list[str]) -> np.ndarray:
    """(len(names),) identity numbers (-1 where an image has no row)."""
    table = {name: int(ident) for name, ident in _read_table(path, 2)}
    return np.array([table.get(n, -1) for n in names], dtype=np.int64)


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    root = require_root(cfg)
    base, image_dir = find_layout(root)
    files = image_files(image_dir, recursive=False)
    if not files:
        raise DataError(f"'{image_dir}': no image files in it (expected 000001.jpg ...)")
    size, channels = cfg.size or DEFAULT_SIZE, cfg.channels or 3
    crop = cfg.crop or DEFAULT_CROP
    images, manifest = cache.prepare(
        "celeba", image_dir, files, cfg, size, crop, channels, progress
    )
    names: list[str] = manifest["images"]

    if (base / PARTITION).is_file():
        partition = read_partition(base / PARTITION)
        present = set(files)
        missing = sum(1 for name in partition if name not in present)
        if missing:
            log.info(
                f"{PARTITION} lists {missing} images that are not in {image_dir}: "
                f"training on the {len(names)} usable images present"
            )
        split = np.array([partition.get(n, -1) for n in names])
        if (split < 0).any():
            log.warning(f"ignoring {(split < 0).sum()} images that {PARTITION} does not list")
    else:
        log.warning(
            f"no {PARTITION} in {base}: using the official split by file number "
            f"(1-{LAST_TRAIN} train, {LAST_TRAIN + 1}-{LAST_VALID} valid, the rest test)"
        )
        split = np.array([-1 if (s := split_by_number(n)) is None else s for n in names])
        if (split < 0).any():
            log.warning(f"ignoring {(split < 0).sum()} images whose names are not numbers")

    train_idx, val_idx, test_idx = (np.flatnonzero(split == s) for s in range(3))
    if len(train_idx) == 0:
        raise DataError(f"'{image_dir}': none of the usable images belongs to the train split")
    if len(val_idx) == 0:
        # Part of CelebA, e.g. only its first images: hold out a stable share of train instead.
        tr, va = hash_split([names[i] for i in train_idx], cfg.val_fraction)
        train_idx, val_idx = train_idx[tr], train_idx[va]
        log.warning(
            f"no image of the official valid split is present: holding out {len(val_idx)} "
            f"train images (data.val_fraction={cfg.val_fraction}) for validation"
        )
    attributes = (
        read_attributes(base / ATTRIBUTES, names) if (base / ATTRIBUTES).is_file() else None
    )
    labels = read_identities(base / IDENTITIES, names) if (base / IDENTITIES).is_file() else None
    full = ImageDataset(images, labels=labels, attributes=attributes)
    log.info(
        f"celeba {image_dir}: {len(train_idx)} train, {len(val_idx)} valid, {len(test_idx)} test"
    )
    test = full.subset(test_idx) if len(test_idx) else None
    return Splits(full.subset(train_idx), full.subset(val_idx), test, info=manifest)
