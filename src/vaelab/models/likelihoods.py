"""Decoder likelihoods p(x|z) as objects: each knows its negative log-likelihood, its mean, how
to sample, and how to turn a log-likelihood into bits per dimension.

The decoder outputs logits of shape (m, B, C, H, W) (m samples of z per image); ``terms``
returns two (m, B) tensors: ``recon``, the part of -log p(x|z) that training and the curves
show (for the fixed-variance Gaussian, the squared error over 2 sigma^2), and ``nll``, the whole
-log p(x|z) in nats with every constant, which the ELBO and importance sampling use.

Bits per dimension (docs/science.md): pixels are k/255, k = 0..255, so a density on [0, 1]^K
describes 8-bit data through bins of width 1/255 around each value. The probability of a bin is
p(x) / 255 per dimension up to the density's curvature over the bin (about 1e-3 nats per image
for sigma^2 = 1/2, checked in tests/test_likelihoods.py against the exact Gaussian bin masses),
so bpd = (-log p(x) / K + ln 255) / ln 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vaelab import losses


def _flat(x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, ...) repeated for each of the m samples of logits (m, B, ...): both (m*B, ...)."""
    return x.unsqueeze(0).expand_as(logits).flatten(0, 1), logits.flatten(0, 1)


class Likelihood(nn.Module):
    """p(x|z) from the decoder's logits. Subclasses define ``terms`` and ``mean``."""

    def terms(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(recon, nll) per sample and image, (m, B) each, for x (B, C, H, W) and logits
        (m, B, C, H, W)."""
        raise NotImplementedError

    def nll(self, x: Tensor, logits: Tensor) -> Tensor:
        """-log p(x|z) in nats with every constant, (m, B)."""
        return self.terms(x, logits)[1]

    def mean(self, logits: Tensor) -> Tensor:
        """E[x|z] in [0, 1]."""
        return torch.sigmoid(logits)

    def sample(self, logits: Tensor) -> Tensor:
        """One draw x ~ p(x|z) per element of ``logits``."""
        raise NotImplementedError

    def bits_per_dim(self, log_px_nats: float, num_dims: int) -> float:
        """Bits per dimension of 8-bit data from a log-likelihood (or bound) in nats per image."""
        return losses.bits_per_dim(log_px_nats, num_dims)

    def logged(self) -> dict[str, Tensor]:
        """Scalars of the likelihood that a run logs beside its terms (none by default)."""
        return {}


class FixedGaussian(Likelihood):
    """N(x; mean, sigma2 I) with sigma2 fixed (model.sigma2). sigma2 = 1/2 makes recon the plain
    sum of squared errors, the derivation's loss."""

    def __init__(self, sigma2: float) -> None:
        super().__init__()
        self.sigma2 = sigma2

    def terms(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        m = logits.shape[0]
        flat_x, flat_logits = _flat(x, logits)
        sse = losses.squared_error(flat_x, self.mean(flat_logits)).view(m, -1)
        recon = sse / (2.0 * self.sigma2)
        return recon, recon + losses.gaussian_nll_constant(x[0].numel(), self.sigma2)

    def sample(self, logits: Tensor) -> Tensor:
        mean = self.mean(logits)
        return mean + math.sqrt(self.sigma2) * torch.randn_like(mean)


class LearnedGaussian(Likelihood):
    """N(x; mean, sigma2 I) with one variance for all pixels, learned from the data (sigma-VAE,
    Rybkin et al. 2021).

    In training, each batch uses its own optimum sigma*^2 = (sum of squared errors) / (n K), as
    the paper does, and folds it into ``sigma2``, a running average kept with the model (like
    batch norm's statistics: the buffer is saved, loaded and restored on resume). Evaluation uses
    ``sigma2``, so every image is scored by one fixed model, whatever the batch or chunking.
    """

    MOMENTUM = 0.1  # weight of each training batch's sigma*^2 in the running value

    def __init__(self, floor: float) -> None:
        super().__init__()
        self.floor = floor
        self.register_buffer("sigma2", torch.ones(()))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def terms(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        m, k = logits.shape[0], x[0].numel()
        flat_x, flat_logits = _flat(x, logits)
        sse = losses.squared_error(flat_x, self.mean(flat_logits)).view(m, -1)
        if self.training:
            sigma2 = (sse.mean() / k).clamp_min(self.floor)  # argmin of the batch's NLL
            with torch.no_grad():
                weight = torch.where(self.batches > 0, self.MOMENTUM, 1.0)
                self.sigma2.lerp_(sigma2.detach().to(self.sigma2.dtype), weight)
                self.batches += 1
        else:
            sigma2 = self.sigma2.to(sse.dtype)
        # recon: all but K/2 log(2 pi); with a learned variance, log sigma^2 is no constant.
        recon = sse / (2.0 * sigma2) + 0.5 * k * sigma2.log()
        return recon, recon + 0.5 * k * losses.LOG_2PI

    def sample(self, logits: Tensor) -> Tensor:
        mean = self.mean(logits)
        return mean + self.sigma2.sqrt() * torch.randn_like(mean)

    def logged(self) -> dict[str, Tensor]:
        return {"sigma2": self.sigma2}


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels with probabilities sigmoid(logits): a likelihood of binary
    data (data.binarize=true); on grey values it is the cross-entropy, not a density."""

    def terms(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        flat_x, flat_logits = _flat(x, logits)
        nll = losses.bernoulli_nll(flat_x, flat_logits).view(logits.shape[0], -1)
        return nll, nll

    def sample(self, logits: Tensor) -> Tensor:
        return torch.bernoulli(self.mean(logits))

    def bits_per_dim(self, log_px_nats: float, num_dims: int) -> float:
        """Bits per binary pixel: a probability of binary data needs no bin width."""
        return -log_px_nats / (num_dims * math.log(2.0))


def from_config(likelihood: str, sigma2: float) -> Likelihood:
    """The likelihood that model.likelihood names."""
    if likelihood == "bernoulli":
        return Bernoulli()
    return FixedGaussian(sigma2)
