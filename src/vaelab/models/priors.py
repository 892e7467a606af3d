"""Priors p(z) as objects: each knows its log density, how to sample, and its KL from a
diagonal Gaussian posterior when that has a closed form.

The model holds its prior as ``model.prior`` (built by ``GenerativeModel.build_prior``), and
everything that needs p(z) reads it there: the KL of the training loss (closed form when the
prior has one, else Monte Carlo over the draws of z), sampling, the importance weights, AIS and
the gap's ELBOs. ``StandardNormal`` is every built-in model's prior but vamp_vae's; it computes
exactly what vaelab computed before priors were objects (the same functions, in the same order),
so no number of those models changed. ``VampPrior`` (Tomczak & Welling 2018) is a uniform
mixture of the encoder's posteriors at learned pseudo-inputs; ``GaussianMixture`` is that
mixture with its components held fixed (what AIS and the gap evaluate many times over).

Interface (``Prior``), z of shape (..., d):

- ``log_prob(z) -> (...)``: log p(z) in nats, normalised;
- ``sample(shape, temperature, device, dtype) -> (*shape, d)``: draws from torch's global
  generator (seeded sampling gives what it gave before for the standard normal);
- ``analytic_kl(q) -> (B,)`` and ``analytic_kl_per_dim(q) -> (B, d)``: KL(q(z|x) || p(z)) in
  closed form, or None when there is none (the model then estimates it by Monte Carlo,
  ``monte_carlo_kl``);
- ``fixed()``: the same density with its parameters as constants (no encoder pass per call).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab import losses

if TYPE_CHECKING:  # base builds the standard normal prior: no import at run time
    from vaelab.models.base import DiagonalGaussian

Shape = int | tuple[int, ...]


def _lead(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


class Prior(nn.Module):
    """p(z) over R^d. Subclasses define ``log_prob`` and ``sample``; a prior with a closed-form
    KL from a diagonal Gaussian overrides ``analytic_kl_per_dim``."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(z) for z (..., d) -> (...)."""
        raise NotImplementedError

    def sample(
        self,
        shape: Shape,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draws z ~ p(z) of shape (*shape, d), each component's spread scaled by
        ``temperature``; from torch's global generator."""
        raise NotImplementedError

    def analytic_kl_per_dim(self, q: DiagonalGaussian) -> Tensor | None:
        """KL(q_j || p_j) per image and latent dimension, (B, d), or None where the prior does
        not factorise into a closed form."""
        return None

    def analytic_kl(self, q: DiagonalGaussian) -> Tensor | None:
        """KL(q || p) per image, (B,), in closed form, or None."""
        per_dim = self.analytic_kl_per_dim(q)
        return None if per_dim is None else per_dim.sum(-1)

    def monte_carlo_kl(self, q: DiagonalGaussian, z: Tensor) -> Tensor:
        """The KL estimated on draws z (m, B, d) of q: mean_m [log q(z|x) - log p(z)], (B,);
        unbiased, and exact in expectation whatever the prior."""
        return (q.log_prob(z) - self.log_prob(z)).mean(0)

    def kl(self, q: DiagonalGaussian, z: Tensor) -> Tensor:
        """KL(q || p) per image, (B,): closed form where there is one, else Monte Carlo on the
        draws z (m, B, d) that the ELBO's reconstruction term uses."""
        exact = self.analytic_kl(q)
        return self.monte_carlo_kl(q, z) if exact is None else exact

    def fixed(self) -> Prior:
        """This density with its parameters as constants (for estimators that evaluate it many
        times under a model held fixed: AIS, q*). Default: itself."""
        return self


class StandardNormal(Prior):
    """p(z) = N(0, I): the prior of the derivation (docs/science.md) and of every built-in model
    but vamp_vae. No parameters, so the state_dict of a model does not change."""

    def log_prob(self, z: Tensor) -> Tensor:
        return losses.standard_normal_log_prob(z)

    def sample(
        self,
        shape: Shape,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        return temperature * torch.randn(*_lead(shape), self.latent_dim, device=device, dtype=dtype)

    def analytic_kl_per_dim(self, q: DiagonalGaussian) -> Tensor:
        return q.kl_per_dim()  # 1/2 (mu^2 + sigma^2 - log sigma^2 - 1), Kingma & Welling 2014


# Elements of the (rows, K, d) differences that ``mixture_log_prob`` holds at once (64 MB in
# fp32): AIS evaluates the prior for chains x images rows, and K d reaches 32,000 for the
# paper's 500 components of 64 dimensions.
MIXTURE_ELEMENTS = 2**24


def mixture_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log 1/K sum_k N(z; mu_k, diag exp(logvar_k)) for z (..., d) and components mu, logvar
    (K, d) -> (...): each component's log density from the differences z - mu_k (not expanded
    into z^2 - 2 z mu + mu^2, which cancels badly in fp32 far from a narrow component), then
    logsumexp over k (stable: it subtracts the largest before exponentiating) minus log K; in
    chunks of rows of at most MIXTURE_ELEMENTS differences. In the promoted dtype of z and the
    components (fp32, or fp64 for fp64 runs and tests)."""
    lead, (k, d) = z.shape[:-1], mu.shape
    rows = z.reshape(-1, d)
    step = max(1, MIXTURE_ELEMENTS // (k * d))
    parts = [
        torch.logsumexp(losses.gaussian_log_prob(chunk.unsqueeze(-2), mu, logvar), dim=-1)
        for chunk in rows.split(step)
    ]  # each (rows, K) -> (rows,)
    return (torch.cat(parts) - math.log(k)).reshape(lead)


def mixture_sample(shape: Shape, mu: Tensor, logvar: Tensor, temperature: float) -> Tensor:
    """Draws of the uniform mixture: a component k uniformly, then mu_k + T sigma_k eps,
    (*shape, d); both from torch's global generator."""
    lead = _lead(shape)
    k = torch.randint(mu.shape[0], lead, device=mu.device)
    eps = torch.randn(*lead, mu.shape[1], device=mu.device, dtype=mu.dtype)
    return mu[k] + temperature * torch.exp(0.5 * logvar[k]) * eps


def _to(z: Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    return z.to(device=z.device if device is None else device, dtype=dtype or z.dtype)


class GaussianMixture(Prior):
    """The uniform mixture 1/K sum_k N(mu_k, diag exp(logvar_k)) with fixed components (K, d)
    (buffers): what a VampPrior is for a model held fixed."""

    def __init__(self, mu: Tensor, logvar: Tensor) -> None:
        super().__init__(mu.shape[-1])
        self.register_buffer("mu", mu)
        self.register_buffer("logvar", logvar)

    def log_prob(self, z: Tensor) -> Tensor:
        return mixture_log_prob(z, self.mu, self.logvar)

    def sample(
        self,
        shape: Shape,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        return _to(mixture_sample(shape, self.mu, self.logvar, temperature), device, dtype)


class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior"):
    p(z) = 1/K sum_k q(z | u_k), the mixture of the model's own posteriors at K pseudo-inputs
    u_k, images learned with the rest of the model.

    ``pseudo_inputs`` (K, C, H, W) is the parameter; the images the encoder sees are
    hardtanh(pseudo_inputs, 0, 1), in the data's range, as in the paper's code. ``encode``
    maps images to q(z|x): the model's (VampVAE passes one that runs batch norms on their
    running statistics, so the prior does not depend on the batch). It is a plain attribute,
    not a submodule: the encoder's weights belong to the model, once in its state_dict.
    Each ``log_prob`` or ``sample`` encodes the pseudo-inputs again (K images; the gradient
    reaches them and the encoder); ``fixed()`` encodes them once.
    """

    def __init__(
        self,
        latent_dim: int,
        shape: tuple[int, int, int],
        components: int,
        encode: Callable[[Tensor], DiagonalGaussian],
    ) -> None:
        super().__init__(latent_dim)
        # N(0.5, 0.01^2): inside (0, 1), so no pixel starts clamped by the hardtanh (whose
        # gradient is 0 outside); the paper initialises near a constant with std 0.01 too.
        self.pseudo_inputs = nn.Parameter(torch.empty(components, *shape).normal_(0.5, 0.01))
        self.encode = encode

    def images(self) -> Tensor:
        """The pseudo-inputs as images in [0, 1], (K, C, H, W)."""
        return F.hardtanh(self.pseudo_inputs, 0.0, 1.0)

    def components(self) -> DiagonalGaussian:
        """q(z | u_k) of each pseudo-input: mu, logvar (K, d)."""
        return self.encode(self.images())

    def log_prob(self, z: Tensor) -> Tensor:
        c = self.components()
        return mixture_log_prob(z, c.mu, c.logvar)

    def sample(
        self,
        shape: Shape,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        c = self.components()
        return _to(mixture_sample(shape, c.mu, c.logvar, temperature), device, dtype)

    def fixed(self) -> GaussianMixture:
        c = self.components()
        return GaussianMixture(c.mu.detach(), c.logvar.detach())
