"""``idx`` and ``fashion_mnist``: MNIST-format IDX files (optionally gzipped).

Files under data.root: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte (each possibly with .gz). train is split into train/val (stratified by
label, data.val_fraction, data.seed); t10k is the test split. Debian's dataset-fashion-mnist
package installs Fashion-MNIST in this format under /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from vaelab.config import DataConfig
from vaelab.data.base import (
    DataError,
    ImageDataset,
    Splits,
    available_memory,
    format_bytes,
    resize_array,
    stratified_split,
)
from vaelab.data.folder import require_root

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


ROLES = {"images": (IMAGES_MAGIC, "(N, H, W) images"), "labels": (LABELS_MAGIC, "(N,) labels")}


def read_idx(path: Path, role: str) -> np.ndarray:
    """An IDX file of unsigned bytes: ``role`` 'images' (N, H, W) or 'labels' (N,).

    The header is checked before the data is read: the magic number must be the one of the
    role (an images file given as labels is refused, and vice versa), and the size it declares
    (a Python int: it cannot overflow) must fit in memory and match the bytes present.
    """
    magic_expected, what = ROLES[role]
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"'{path}': too short for an IDX file ({len(head)} bytes)")
            magic = int.from_bytes(head, "big")
            if magic >> 8 != 0x08:  # two zero bytes, then 0x08: unsigned bytes
                raise DataError(
                    f"'{path}': not an IDX file of unsigned bytes (magic {magic:#010x}; "
                    f"expected {magic_expected:#010x} for {what})"
                )
            if magic != magic_expected:
                found = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(magic)
                found = f"of {found}" if found else f"of {magic & 0xFF} dimensions"
                raise DataError(
                    f"'{path}': an IDX file {found} (magic {magic:#010x}), where {role} were "
                    f"expected (magic {magic_expected:#010x}, {what})"
                )
            ndim = magic & 0xFF
            header = f.read(4 * ndim)
            if len(header) < 4 * ndim:
                raise DataError(f"'{path}': the IDX header is cut short (expected {ndim} sizes)")
            dims = [int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            need = math.prod(dims)  # Python ints: a header of huge sizes cannot overflow
            if dims[0] == 0:
                raise DataError(f"'{path}': the IDX header says it holds 0 {role}")
            if 0 in dims:
                raise DataError(f"'{path}': the IDX header says its {role} are {dims[1:]} pixels")
            if opener is open:  # the bytes present are known before reading them
                present = os.fstat(f.fileno()).st_size - 4 - 4 * ndim
                if present != need:
                    raise DataError(
                        f"'{path}': the IDX header says {dims} ({need:,} bytes of data), but "
                        f"the file holds {present:,} bytes after it"
                    )
            free = available_memory()
            if free is not None and need > free:
                raise DataError(
                    f"'{path}': its IDX header says {dims} ({format_bytes(need)} of data), "
                    f"more than the {format_bytes(free)} of memory available"
                )
            raw = f.read(need + 1)  # one byte more than declared: detects trailing data
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"'{path}': cannot read ({err})") from None
    if len(raw) != need:
        held = "more" if len(raw) > need else f"only {len(raw):,} bytes"
        raise DataError(
            f"'{path}': the IDX header says {dims} ({need:,} bytes of data), but the file "
            f"holds {held} after it"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images = find(folder, f"{prefix}-images-idx3-ubyte")
    labels = find(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None:
        return None
    x = read_idx(images, "images")
    y = read_idx(labels, "labels") if labels is not None else np.zeros(len(x), np.int64)
    if len(y) != len(x):
        raise DataError(f"'{labels}': {len(y)} labels for the {len(x)} images of '{images}'")
    return x[..., None], y.astype(np.int64)


def build_from(folder: Path, cfg: DataConfig) -> Splits:
    train = _pair(folder, "train")
    if train is None:
        raise DataError(f"'{folder}': expected train-images-idx3-ubyte[.gz] (and its labels) in it")
    test = _pair(folder, "t10k")
    if test is not None and test[0].shape[1:] != train[0].shape[1:]:
        raise DataError(
            f"'{find(folder, 't10k-images-idx3-ubyte')}': images of {test[0].shape[1:3]} pixels, "
            f"but the train images are {train[0].shape[1:3]}"
        )
    size, channels = cfg.size or min(train[0].shape[1:3]), cfg.channels or 1
    name = str(find(folder, "train-images-idx3-ubyte"))
    x = resize_array(train[0], size, channels, name)
    train_idx, val_idx = stratified_split(train[1], cfg.val_fraction, cfg.seed)
    full = ImageDataset(x, train[1])
    test_set = None
    if test is not None:
        name = str(find(folder, "t10k-images-idx3-ubyte"))
        test_set = ImageDataset(resize_array(test[0], size, channels, name), test[1])
    return Splits(
        full.subset(train_idx), full.subset(val_idx), test_set, info={"folder": str(folder)}
    )


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    return build_from(require_root(cfg), cfg)


def build_fashion_mnist(cfg: DataConfig, progress: bool = True) -> Splits:
    if cfg.root:
        return build(cfg)
    if find(FASHION_MNIST_DIR, "train-images-idx3-ubyte") is None:
        raise DataError(
            f"data.name=fashion_mnist: no IDX files in {FASHION_MNIST_DIR}; install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set data.root=PATH"
        )
    return build_from(FASHION_MNIST_DIR, cfg)
