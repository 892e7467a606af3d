"""What a model draws: samples, reconstructions, interpolations, latent traversals.

Each function returns images (N, C, H, W) in [0, 1], laid out for ``image_grid`` with ``nrow``
columns; the CLI and the HTML report turn them into PNGs. Randomness is seeded and does not
disturb the caller's generators. A conditional model (cvae) draws each real image with its own
condition, and its samples with conditions drawn from a dataset (``vaelab.conditions``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vaelab import conditions
from vaelab.data import ImageDataset
from vaelab.models.base import GenerativeModel
from vaelab.rng import seeded
from vaelab.samplers import CodeSampler, LatentMixture


def _device(model: GenerativeModel) -> torch.device:
    return next(model.parameters()).device


def spread(dataset: ImageDataset, n: int) -> np.ndarray:
    """n positions spread evenly over a dataset (covers every class of a class-sorted set)."""
    return np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(np.int64)


@torch.no_grad()
def samples(
    model: GenerativeModel,
    n: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    mixture: LatentMixture | CodeSampler | None = None,
    data: ImageDataset | None = None,
    fixed: dict[int, int] | None = None,
    condition: Tensor | None = None,
) -> Tensor:
    """n decoder means for z ~ N(0, temperature^2 I), or for z from a post-hoc ``mixture``
    (``vaelab.samplers``: its components' spread scaled by the temperature). A conditional
    model samples under conditions drawn from ``data`` with the variables ``fixed`` held
    (``conditions.draw``), or all n under one ``condition`` (V,) when it is given."""
    if condition is not None:
        under = conditions.held(model, condition, n)
    else:
        under = conditions.drawn(model, data, n, fixed, seed)
    with under:
        if mixture is not None:
            param = next(model.parameters())
            z = mixture.sample(n, temperature, seed).to(param.device, param.dtype)
            return model.eval().decode(z).cpu()
        with seeded(seed):
            return model.eval().sample(n, temperature).cpu()


@torch.no_grad()
def reconstructions(
    model: GenerativeModel, dataset: ImageDataset, n: int = 16, nrow: int = 8, seed: int = 0
) -> tuple[Tensor, str]:
    """Rows of ``nrow`` real images, each above their reconstructions; and a caption.

    A model without an encoder cannot reconstruct: its row shows f(z) for z ~ p(z) instead.
    """
    model.eval()
    index = spread(dataset, n)
    x = dataset.batch(index, _device(model))
    with seeded(seed), conditions.given(model, dataset, index):
        if model.has_encoder:
            out, what = model.reconstruct(x), "reconstructions"
        else:
            out, what = model.sample(len(x)), "f(z), z ~ p(z) (no encoder)"
    rows = [torch.cat([x[i : i + nrow], out[i : i + nrow]]) for i in range(0, len(x), nrow)]
    return torch.cat(rows).cpu(), f"val images above {what}"


def latents(model: GenerativeModel, dataset: ImageDataset, index: np.ndarray) -> Tensor:
    """Posterior means of the images at ``index``; prior samples for a model without encoder."""
    if model.has_encoder:
        with conditions.given(model, dataset, index):
            return model.encode(dataset.batch(index, _device(model))).mode()
    return torch.randn(len(index), model.cfg.latent_dim, device=_device(model))


@torch.no_grad()
def interpolations(
    model: GenerativeModel, dataset: ImageDataset, pairs: int = 6, steps: int = 10, seed: int = 0
) -> Tensor:
    """One row per pair of real images: decoded points on the line between their latents
    (a conditional model's row under its first image's condition)."""
    model.eval()
    with seeded(seed):
        pairs = min(pairs, len(dataset) // 2)  # pairs of distinct images, as many as there are
        index = np.random.default_rng(seed).permutation(len(dataset))[: 2 * pairs]
        z = latents(model, dataset, index).view(-1, 2, model.cfg.latent_dim)  # (P, 2, d)
    t = torch.linspace(0, 1, steps, device=z.device)[None, :, None]  # (1, S, 1)
    path = z[:, :1] * (1 - t) + z[:, 1:] * t  # (P, S, d)
    with conditions.given(model, dataset, index[0::2].repeat(steps)):
        return model.decode(path.flatten(0, 1)).cpu()


@torch.no_grad()
def active_dimensions(
    model: GenerativeModel, dataset: ImageDataset, k: int, n: int = 500
) -> list[int]:
    """The k latent dimensions with the largest mean KL over (up to) n images, most first.

    Without an encoder every dimension is equally unused: the first k are returned.
    """
    if not model.has_encoder:
        return list(range(min(k, model.cfg.latent_dim)))
    index = spread(dataset, n)
    with conditions.given(model, dataset, index):
        q = model.eval().encode(dataset.batch(index, _device(model)))
    order = q.kl_per_dim().mean(0).argsort(descending=True)
    return order[:k].tolist()


@torch.no_grad()
def traversal(
    model: GenerativeModel,
    dataset: ImageDataset,
    dims: list[int],
    steps: int = 9,
    limit: float = 3.0,
    seed: int = 0,
) -> Tensor:
    """One row per latent dimension: that dimension swept from -limit to limit, the others at
    the posterior mean of one real image (0 for a model without an encoder)."""
    model.eval()
    with seeded(seed):
        base = latents(model, dataset, spread(dataset, 1))[0]
    under = conditions.given(model, dataset, spread(dataset, 1).repeat(len(dims) * steps))
    if not model.has_encoder:
        base = torch.zeros_like(base)
    values = torch.linspace(-limit, limit, steps, device=base.device)
    z = base.repeat(len(dims), steps, 1)  # (D, S, d)
    for row, dim in enumerate(dims):
        z[row, :, dim] = values
    with under:  # a conditional model: the image's own condition
        return model.decode(z.flatten(0, 1)).cpu()
