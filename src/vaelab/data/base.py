"""The dataset interface: uint8 images held in memory, turned into float batches on demand.

Images are stored as (N, H, W, C) uint8, the layout of the preprocessing cache that larger
sources will write; ``batch`` converts only the rows it is asked for, so no float copy of the
whole dataset is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """Data that cannot be read or split (message names the file or key)."""


class ImageDataset:
    """Images (N, H, W, C) uint8 with optional integer labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                f"images: expected uint8 (N, H, W, C), got {images.dtype} {images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise DataError(f"labels: expected {len(images)} entries, got {len(labels)}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, as the networks see it."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def batch(
        self, index: np.ndarray | Tensor | slice, device: str | torch.device = "cpu"
    ) -> Tensor:
        """Float images in [0, 1], (B, C, H, W), for the given rows."""
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        raw = torch.from_numpy(np.ascontiguousarray(self.images[index])).to(device)
        return raw.permute(0, 3, 1, 2).float().div_(255.0)

    def subset(self, index: np.ndarray) -> ImageDataset:
        labels = None if self.labels is None else self.labels[index]
        return ImageDataset(self.images[index], labels)


@dataclass(frozen=True)
class Splits:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None = None


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): the same share of every class in val, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = max(1, round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
