"""The dataset interface: uint8 images in memory (or memory-mapped), float batches on demand.

Images are stored as (N, H, W, C) uint8, the layout of the preprocessing cache; a dataset is a
view of rows of such an array, so train/val/test splits share one array and nothing is copied.
``batch`` converts only the rows it is asked for: no per-image Python loop, no decoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaelab.machine import available_memory
from vaelab.rng import batch_rand

log = logging.getLogger("vaelab")


class DataError(ValueError):
    """Data that cannot be found, read or split (message names the file or key)."""


class ImageDataset:
    """Rows ``rows`` (default: all) of ``images`` (N, H, W, C) uint8.

    labels: optional (N,) integers (digit class, CelebA identity); attributes: optional name ->
    (N,) arrays (CelebA's 40 binary attributes as -1/1); factors: optional (N, F) integer
    indices of the true generative factors (the ``shapes`` data), named in ``factor_names`` with
    ``factor_sizes`` values each. All are indexed like ``images``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        rows: np.ndarray | None = None,
        attributes: dict[str, np.ndarray] | None = None,
        binarize: bool = False,
        factors: np.ndarray | None = None,
        factor_names: tuple[str, ...] = (),
        factor_sizes: tuple[int, ...] = (),
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                f"images: expected uint8 (N, H, W, C), got {images.dtype} {images.shape}"
            )
        if labels is not None and len(labels) != len(images):
            raise DataError(f"labels: expected {len(images)} entries, got {len(labels)}")
        self.images = images
        self._labels = labels
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
        self._attributes = attributes or {}
        self.binarize = binarize  # batches thresholded at 1/2, for a Bernoulli likelihood
        if factors is not None and (len(factors) != len(images) or factors.ndim != 2):
            raise DataError(f"factors: expected ({len(images)}, F), got {factors.shape}")
        self._factors = factors
        self.factor_names = tuple(factor_names)
        self.factor_sizes = tuple(factor_sizes)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, as the networks see it."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    @property
    def labels(self) -> np.ndarray | None:
        return None if self._labels is None else self._labels[self.rows]

    @property
    def factors(self) -> np.ndarray | None:
        """(len, F) factor indices of this dataset's images, or None."""
        return None if self._factors is None else self._factors[self.rows]

    @property
    def attributes(self) -> dict[str, np.ndarray]:
        return {k: v[self.rows] for k, v in self._attributes.items()}

    def uint8(self, index: np.ndarray | slice) -> np.ndarray:
        """The stored images (B, H, W, C) uint8 for positions ``index`` of this dataset."""
        rows = self.rows[index]
        if isinstance(index, slice) and len(rows) and rows[-1] - rows[0] == len(rows) - 1:
            return np.array(self.images[rows[0] : rows[-1] + 1])  # contiguous: one read
        return self.images[rows]

    def batch(
        self, index: np.ndarray | Tensor | slice, device: str | torch.device = "cpu"
    ) -> Tensor:
        """Float images in [0, 1], (B, C, H, W), for positions ``index`` of this dataset."""
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        raw = torch.from_numpy(np.ascontiguousarray(self.uint8(index))).to(device)
        return to_float(raw, self.binarize)

    def subset(self, index: np.ndarray) -> ImageDataset:
        """A view of positions ``index`` of this dataset (no copy of the images)."""
        return ImageDataset(
            self.images,
            self._labels,
            self.rows[index],
            self._attributes,
            self.binarize,
            self._factors,
            self.factor_names,
            self.factor_sizes,
        )


def to_float(raw: Tensor, binarize: bool) -> Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float in [0, 1] (or {0, 1} when ``binarize``)."""
    if binarize:
        return (raw.permute(0, 3, 1, 2) >= 128).float()
    return raw.permute(0, 3, 1, 2).float().div_(255.0)


class DeviceImages:
    """A dataset's uint8 images copied once to ``device`` (a GPU); batches are indexed and
    normalised there, so a training step moves no image across the bus. Same ``batch`` as
    ImageDataset, with indices given as a tensor or slice."""

    def __init__(self, dataset: ImageDataset, device: torch.device) -> None:
        rows = np.ascontiguousarray(dataset.uint8(slice(None)))
        self.images = torch.from_numpy(rows).to(device)
        self.binarize = dataset.binarize

    def batch(self, index: Tensor | slice, device: str | torch.device | None = None) -> Tensor:
        return to_float(self.images[index], self.binarize)

    @staticmethod
    def fits(dataset: ImageDataset, device: torch.device) -> bool:
        """Whether the images take under a quarter of the device's free memory."""
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        return len(dataset) * int(np.prod(dataset.images.shape[1:])) < free // 4


def batch_source(dataset: ImageDataset, device: torch.device) -> ImageDataset | DeviceImages:
    """Where training batches come from: the images on the GPU when they fit there (a batch is
    then an index, a gather and a division on the device), else the dataset itself."""
    return DeviceImages(dataset, device) if DeviceImages.fits(dataset, device) else dataset


@dataclass(frozen=True)
class Splits:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the cache's path and counts


def random_hflip(x: Tensor) -> Tensor:
    """Flip each image of (B, C, H, W) left-right with probability 1/2 (torch's global RNG)."""
    flip = batch_rand((x.shape[0],), 0, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


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


def format_bytes(n: int) -> str:
    """A byte count for a message: '2.4 GB', '310 MB'."""
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_memory(need: int, size: int, what: str) -> None:
    """Refuse, before allocating, ``need`` bytes of images (``what``, at data.size ``size``)
    that memory cannot hold."""
    free = available_memory()
    if free is not None and need > free:
        raise DataError(
            f"data.size={size}: {what} would need {format_bytes(need)} of memory, but only "
            f"{format_bytes(free)} are available; choose a smaller data.size"
        )


def resize_array(
    images: np.ndarray, size: int, channels: int, name: str = "the images"
) -> np.ndarray:
    """Resize (N, H, W, C) uint8 to (N, size, size, channels), antialiased; for small in-memory
    sources whose native size differs from data.size (a one-off, not a training-time step).

    Rectangular images are centre-cropped to the square of their short side first (as image
    files are), never squashed; ``name`` (the source file) is named in the line saying so.
    """
    from PIL import Image

    n, h, w, c = images.shape
    need = n * size * size * max(c, channels)
    if c != channels:
        need += n * size * size * min(c, channels)  # the resized array, then its conversion
    check_memory(need, size, f"{n:,} images of {size}x{size}x{channels}")
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[:, top : top + side, left : left + side]  # a view: nothing copied
        log.info(f"{name}: {w}x{h} images, centre-cropped to {side}x{side} before resizing")
        h = w = side
        if side == size:
            images = np.ascontiguousarray(images)
    if (h, w) != (size, size):
        out = np.empty((n, size, size, c), np.uint8)
        for i, img in enumerate(images):
            pil = Image.fromarray(np.ascontiguousarray(img[..., 0] if c == 1 else img))
            resized = pil.resize((size, size), Image.Resampling.LANCZOS)
            out[i] = np.asarray(resized).reshape(size, size, c)
        images = out
    if channels == 3 and c == 1:
        images = np.repeat(images, 3, axis=3)
    elif channels == 1 and c == 3:
        weights = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as Pillow's convert("L")
        images = (images @ weights).round().clip(0, 255).astype(np.uint8)[..., None]
    return images
