"""Loss terms as pure functions: every function returns one value per image, shape (B,).

Sums run over pixels and latent dimensions; averaging over the batch is the caller's job. Mixing
a mean over pixels with a sum over latent dimensions is the most common bug in public VAE code
(it silently rescales beta by the number of pixels), so nothing here averages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def full_precision(t: Tensor) -> Tensor:
    """``t`` in fp32 if it is in a half type (from autocast), else unchanged (fp32, fp64): the
    loss terms are never computed in bf16 or fp16."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _per_image(t: Tensor) -> Tensor:
    """Sum everything but the leading (batch) dimension."""
    return t.flatten(1).sum(1)


def squared_error(x: Tensor, mean: Tensor) -> Tensor:
    """||x - mean||^2 summed over pixels: (B, ...) -> (B,)."""
    return _per_image((x - mean).square())


def gaussian_nll_constant(num_dims: int, sigma2: float) -> float:
    """The part of -log N(x; mean, sigma2 * I) that does not depend on x: K/2 * log(2 pi sigma2)."""
    return 0.5 * num_dims * (LOG_2PI + math.log(sigma2))


def bernoulli_nll(x: Tensor, logits: Tensor) -> Tensor:
    """-log Bernoulli(x; sigmoid(logits)) in nats summed over pixels: (B, ...) -> (B,).

    Exact for binary x; for x in (0, 1) it is the cross-entropy, not a normalised density.
    """
    return _per_image(F.binary_cross_entropy_with_logits(logits, x, reduction="none"))


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in nats: (B, d) -> (B,).

    Closed form (Kingma & Welling 2014, appendix B):
    1/2 * sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1).
    """
    return gaussian_kl_per_dim(mu, logvar).sum(-1)


def gaussian_kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """The KL of each latent dimension, (B, d) -> (B, d); ``gaussian_kl`` is its sum."""
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0)


def free_bits_kl(kl_dims: Tensor, free_bits: float) -> Tensor:
    """KL with free bits (Kingma et al. 2016): (B, d) -> (B,).

    Each latent dimension whose batch-mean KL is below ``free_bits`` nats counts as exactly
    ``free_bits`` (no gradient pushes it lower); the others count their own KL. The batch mean
    of the result is sum_j max(free_bits, mean_b KL_bj), as in the paper, while each image
    keeps its own value. 0 turns it off.
    """
    if free_bits <= 0:
        return kl_dims.sum(-1)
    below = kl_dims.mean(0, keepdim=True) < free_bits  # (1, d)
    return torch.where(below, torch.full_like(kl_dims, free_bits), kl_dims).sum(-1)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag exp(logvar)) summed over the last dimension: (..., d) -> (...)."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar)).sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension: (..., d) -> (...)."""
    return -0.5 * (LOG_2PI + z.square()).sum(-1)


def log_mean_exp(t: Tensor, dim: int = 0) -> Tensor:
    """log(1/m * sum_i exp(t_i)) along ``dim``, computed stably with logsumexp."""
    return torch.logsumexp(t, dim=dim) - math.log(t.shape[dim])


def iw_bound(log_w: Tensor) -> Tensor:
    """Importance-weighted bound (Burda et al. 2016): log 1/K sum_k w_k from (K, B) -> (B,).

    ``log_w`` = log p(x|z_k) + log p(z_k) - log q(z_k|x) with z_k ~ q(z|x). With K = 1 its
    expectation is the ELBO; it rises towards log p(x) as K grows.
    """
    return log_mean_exp(log_w, dim=0)


def bits_per_dim(log_px_nats: float, num_dims: int) -> float:
    """Bits per dimension of 8-bit data from a log-likelihood (or bound) of x scaled to [0, 1].

    Pixels are k/255: each value stands for a bin of width 1/255, whose probability is the
    density times 1/255 per dimension (up to the density's curvature over the bin), so
    bpd = (-log p(x) / K + ln 255) / ln 2 (docs/science.md).
    """
    return (-log_px_nats / num_dims + math.log(255.0)) / math.log(2.0)


def kl_warmup(step: int, warmup_steps: int) -> float:
    """The KL weight at optimizer step ``step``: 0 -> 1 linearly over ``warmup_steps``
    (train.kl_warmup_steps; Bowman et al. 2016, Sonderby et al. 2016), then 1; 0 steps: 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)
