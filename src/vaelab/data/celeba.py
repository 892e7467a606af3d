"""``celeba``: CelebA's aligned faces from a local folder (users download CelebA themselves).

Accepted layouts under data.root (docs/data.md gives the file formats):
  official:     ROOT/img_align_celeba/000001.jpg ..., ROOT/list_eval_partition.txt
  torchvision:  ROOT/celeba/img_align_celeba/..., ROOT/celeba/list_eval_partition.txt
  (and either with the images one folder deeper, img_align_celeba/img_align_celeba/, as the
  popular re-uploads unpack.) Optional: list_attr_celeba.txt, identity_CelebA.txt.

Having only part of the images is normal: training uses the ones present and says how many the
partition file listed that are missing. With no partition file the official split by file number
is used (1-162770 train, 162771-182637 valid, 182638-202599 test).

The text files are read, and every line checked, before any image is prepared: a file that is
not UTF-8, a line with the wrong number of fields, a split that is not 0/1/2, an attribute that
is not -1/1, an identity that is not a whole number, a bad count line or a name listed twice
with two values is refused with one line naming the file and the line number.
"""

from __future__ import annotations

import re
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
VALUES = frozenset(("1", "-1"))  # of an attribute


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


def metadata_file(path: Path) -> Path | None:
    """``path`` if it is a regular file, None if there is nothing by that name; anything else
    there (a dangling link, a folder, a FIFO that would block) is refused."""
    if path.is_file():
        return path
    if path.is_symlink() and not path.exists():
        raise DataError(f"'{path}': a dangling link; expected a text file")
    if path.exists():
        raise DataError(f"'{path}': not a regular file; expected a text file")
    return None


def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every non-blank line of a UTF-8 text file
    (a byte-order mark and Windows line ends are accepted)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"'{path}': cannot read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"'{path}' line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); expected "
            "CelebA's plain-text file"
        ) from None
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        parts = line.split()
        if parts:
            rows.append((n, parts))
    return rows


def _read_table(path: Path, columns: int) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line; each must have ``columns`` fields."""
    rows = read_lines(path)
    for n, parts in rows:
        if len(parts) != columns:
            raise DataError(f"'{path}' line {n}: expected {columns} fields, got {len(parts)}")
    return rows


def _check_repeat(path: Path, n: int, name: str, first: dict[str, int], same: bool) -> None:
    if name in first and not same:
        raise DataError(
            f"'{path}' line {n}: {name} is listed again, with another value than on line "
            f"{first[name]}"
        )


def read_partition(path: Path) -> dict[str, int]:
    """file name -> 0 (train), 1 (valid) or 2 (test)."""
    out: dict[str, int] = {}
    lines: dict[str, int] = {}
    for n, (name, split) in _read_table(path, 2):
        if split not in ("0", "1", "2"):
            raise DataError(
                f"'{path}' line {n}: the split of {name} must be 0, 1 or 2, got '{split}'"
            )
        _check_repeat(path, n, name, lines, out.get(name) == int(split))
        out[name] = int(split)
        lines.setdefault(name, n)
    return out


def split_by_number(name: str) -> int | None:
    """The official split of an image from its file number, or None for another name."""
    stem = Path(name).stem
    if not stem.isdigit():
        return None
    n = int(stem)
    return 0 if n <= LAST_TRAIN else 1 if n <= LAST_VALID else 2


def _is_integer(text: str) -> bool:
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None


def read_attribute_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(attribute names, file name -> its values as '-1'/'1'), every line checked: the count
    line, the names line, then one row per image of a name and one -1/1 per attribute."""
    lines = read_lines(path)
    if len(lines) < 2:
        raise DataError(f"'{path}': expected a count line, a line of attribute names, then rows")
    (n0, first), (n1, header) = lines[0], lines[1]
    if len(first) != 1 or not first[0].isdigit() or not first[0].isascii():
        raise DataError(
            f"'{path}' line {n0}: expected the count line (the number of images), got "
            f"'{' '.join(first)[:60]}'"
        )
    numbers = [name for name in header if _is_integer(name)]
    if numbers:
        raise DataError(
            f"'{path}' line {n1}: expected the attribute names, got the number '{numbers[0]}' "
            "among them"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"'{path}' line {n1}: the attribute {repeated[0]} is named twice")
    table: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for n, parts in lines[2:]:
        if len(parts) != len(header) + 1:
            raise DataError(
                f"'{path}' line {n}: expected {len(header) + 1} fields (a file name and "
                f"{len(header)} values), got {len(parts)}"
            )
        values = parts[1:]
        for attr, value in (
            zip(header, values, strict=True) if not VALUES.issuperset(values) else ()
        ):
            if value not in VALUES:
                raise DataError(
                    f"'{path}' line {n}: attribute values must be -1 or 1, got '{value[:20]}' "
                    f"for {attr}"
                )
        _check_repeat(path, n, parts[0], first_line, table.get(parts[0]) == values)
        table[parts[0]] = values
        first_line.setdefault(parts[0], n)
    count = int(first[0])
    if count != len(lines) - 2:
        raise DataError(
            f"'{path}' line {n0}: the count line says {count} images, but {len(lines) - 2} rows "
            "follow (a file cut short?)"
        )
    return header, table


def read_attributes(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Attribute name -> (len(names),) int8 of -1/1 (0 where an image has no row)."""
    return attributes_of(read_attribute_table(path), names)


def attributes_of(
    table: tuple[list[str], dict[str, list[str]]], names: list[str]
) -> dict[str, np.ndarray]:
    header, rows = table
    values = np.zeros((len(names), len(header)), np.int8)
    for i, name in enumerate(names):
        if name in rows:
            values[i] = np.array(rows[name], dtype=np.int8)
    return {attr: values[:, j] for j, attr in enumerate(header)}


def read_identity_table(path: Path) -> dict[str, int]:
    """file name -> identity number, every line checked."""
    table: dict[str, int] = {}
    lines: dict[str, int] = {}
    for n, (name, ident) in _read_table(path, 2):
        if not (ident.isascii() and ident.isdigit() and len(ident) <= 18):
            raise DataError(
                f"'{path}' line {n}: the identity of {name} must be a whole number >= 0, "
                f"got '{ident[:20]}'"
            )
        _check_repeat(path, n, name, lines, table.get(name) == int(ident))
        table[name] = int(ident)
        lines.setdefault(name, n)
    return table


def read_identities(path: Path, names: list[str]) -> np.ndarray:
    """(len(names),) identity numbers (-1 where an image has no row)."""
    table = read_identity_table(path)
    return np.array([table.get(n, -1) for n in names], dtype=np.int64)


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    root = require_root(cfg)
    base, image_dir = find_layout(root)
    # The metadata files are read (and checked) first: a bad line is refused before the
    # images are prepared, not after.
    partition_path = metadata_file(base / PARTITION)
    attributes_path = metadata_file(base / ATTRIBUTES)
    identities_path = metadata_file(base / IDENTITIES)
    partition = read_partition(partition_path) if partition_path else None
    attribute_table = read_attribute_table(attributes_path) if attributes_path else None
    identity_table = read_identity_table(identities_path) if identities_path else None
    files = image_files(image_dir, recursive=False)
    if not files:
        raise DataError(f"'{image_dir}': no image files in it (expected 000001.jpg ...)")
    size, channels = cfg.size or DEFAULT_SIZE, cfg.channels or 3
    crop = cfg.crop or DEFAULT_CROP
    images, manifest = cache.prepare(
        "celeba", image_dir, files, cfg, size, crop, channels, progress
    )
    names: list[str] = manifest["images"]

    if partition is not None:
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
    attributes = attributes_of(attribute_table, names) if attribute_table else None
    labels = None
    if identity_table is not None:
        labels = np.array([identity_table.get(n, -1) for n in names], dtype=np.int64)
    full = ImageDataset(images, labels=labels, attributes=attributes)
    log.info(
        f"celeba {image_dir}: {len(train_idx)} train, {len(val_idx)} valid, {len(test_idx)} test"
    )
    test = full.subset(test_idx) if len(test_idx) else None
    return Splits(full.subset(train_idx), full.subset(val_idx), test, info=manifest)
