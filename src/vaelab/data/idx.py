"""``idx`` and ``fashion_mnist``: MNIST-format IDX files (optionally gzipped).

Files under data.root: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte (each possibly with .gz). train is split into train/val (stratified by
label, data.val_fraction, data.seed); t10k is the test split. Debian's dataset-fashion-mnist
package installs Fashion-MNIST in this format under /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from vaelab.config import DataConfig
from vaelab.data.base import DataError, ImageDataset, Splits, resize_array, stratified_split
from vaelab.data.folder import require_root

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes: images (N, H, W) or labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"'{path}': cannot read ({err})") from None
    if len(raw) < 8:
        raise DataError(f"'{path}': too short for an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise DataError(f"'{path}': not an IDX file of unsigned bytes (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"'{path}': header says {dims}, but holds {data.size} bytes of data")
    return data.reshape(dims)


def _pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images = find(folder, f"{prefix}-images-idx3-ubyte")
    labels = find(folder, f"{prefix}-labels-idx1-ubyte")
    if images is None:
        return None
    x = read_idx(images)
    if x.ndim != 3:
        raise DataError(f"'{images}': expected 3 dimensions (N, H, W), got {x.shape}")
    y = read_idx(labels) if labels is not None else np.zeros(len(x), np.int64)
    if len(y) != len(x):
        raise DataError(f"'{labels}': {len(y)} labels for {len(x)} images")
    return x[..., None], y.astype(np.int64)


def build_from(folder: Path, cfg: DataConfig) -> Splits:
    train = _pair(folder, "train")
    if train is None:
        raise DataError(f"'{folder}': expected train-images-idx3-ubyte[.gz] (and its labels) in it")
    test = _pair(folder, "t10k")
    size, channels = cfg.size or train[0].shape[1], cfg.channels or 1
    x = resize_array(train[0], size, channels)
    train_idx, val_idx = stratified_split(train[1], cfg.val_fraction, cfg.seed)
    full = ImageDataset(x, train[1])
    test_set = None
    if test is not None:
        test_set = ImageDataset(resize_array(test[0], size, channels), test[1])
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
