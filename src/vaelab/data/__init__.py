"""Data sources by name: ``build(DataConfig)`` returns the train/val(/test) splits.

Each source is a function ``(cfg, progress) -> Splits``; registering one is one line in SOURCES.
Sources that decode image files go through the preprocessing cache (``data/cache.py``), so
training never decodes an image twice.
"""

from __future__ import annotations

from collections.abc import Callable

from vaelab.config import DataConfig
from vaelab.data import celeba, folder, idx, mnist5k, shapes
from vaelab.data.base import DataError, ImageDataset, Splits, random_hflip, stratified_split

SOURCES: dict[str, Callable[[DataConfig, bool], Splits]] = {
    "mnist5k": mnist5k.build,
    "celeba": celeba.build,
    "folder": folder.build,
    "idx": idx.build,
    "fashion_mnist": idx.build_fashion_mnist,
    "shapes": shapes.build,
}


# Sources that can draw new images for any factor values: (render, sample_factors). The
# beta-VAE and FactorVAE scores need images with chosen factors, not only the stored ones.
GENERATORS: dict[str, tuple[Callable[..., object], Callable[..., object]]] = {
    "shapes": (shapes.render, shapes.sample_factors),
}


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    """The splits of the source ``cfg.name``; ``progress`` shows a bar while preparing."""
    if cfg.name not in SOURCES:
        known = ", ".join(sorted(SOURCES))
        raise DataError(
            f"config key 'data.name': unknown data source '{cfg.name}' (known: {known})"
        )
    splits = SOURCES[cfg.name](cfg, progress)
    check_splits(splits, cfg)
    for part in (splits.train, splits.val, splits.test):
        if part is not None:
            part.binarize = cfg.binarize
    return splits


def check_splits(splits: Splits, cfg: DataConfig) -> None:
    """Training needs at least one train and one validation image, whatever the source."""
    n_train, n_val = len(splits.train), len(splits.val)
    if n_train >= 1 and n_val >= 1:
        return
    where = f"data.name={cfg.name}" + (f" (data.root={cfg.root})" if cfg.root else "")
    total = n_train + n_val
    if total < 2:
        hint = "training needs at least 2 images (1 train, 1 val)"
    elif n_train == 0:
        hint = "lower data.val_fraction"
    else:
        hint = "raise data.val_fraction"
    raise DataError(
        f"data.val_fraction={cfg.val_fraction}: {where} gives {n_train} train and {n_val} val "
        f"images of {total}; each split needs at least 1: {hint}"
    )


__all__ = [
    "GENERATORS",
    "SOURCES",
    "DataError",
    "ImageDataset",
    "Splits",
    "build",
    "check_splits",
    "random_hflip",
    "stratified_split",
]
