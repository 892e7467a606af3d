"""Metrics of a trained model on a split. (The full evaluation command builds on this room.)"""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.data import ImageDataset
from vaelab.models.base import GenerativeModel
from vaelab.rng import seeded


def mean_pairwise_distance(images: Tensor) -> float:
    """Mean L2 distance over all pairs i < j of the rows of ``images`` (N, ...)."""
    flat = images.flatten(1).double()
    n = flat.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 images, got {n}")
    d = torch.cdist(flat, flat)
    return (d.sum() / (n * (n - 1))).item()


@torch.no_grad()
def diversity_ratio(
    model: GenerativeModel, dataset: ImageDataset, n: int = 64, seed: int = 0
) -> float:
    """Mean pairwise distance of n prior samples over that of n real images of ``dataset``.

    Near 0: the samples are all the same image (the decoder-only collapse to the average).
    Near 1: the samples are as varied as the data.
    """
    n = min(n, len(dataset))
    with seeded(seed):
        samples = model.sample(n).cpu()
        real = dataset.batch(torch.randperm(len(dataset))[:n])
    return mean_pairwise_distance(samples) / mean_pairwise_distance(real)
