"""What every model shares: the posterior object, the output record, the decoder likelihood.

A model's ``forward(x)`` returns a ``ModelOutput`` of per-image (B,) terms. The trainer only
reads those terms, so a new variant never touches the training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vaelab import losses
from vaelab.config import ModelConfig
from vaelab.nets import build_decoder
from vaelab.rng import batch_randn


@dataclass(frozen=True)
class ModelOutput:
    """Per-image terms, each of shape (B,). Averaging over the batch is the trainer's job.

    loss:  the objective that training minimises (may weight terms, e.g. beta * kl).
    recon: -log p(x|z) without its constant (the sum of squared errors for sigma2 = 1/2),
           averaged over the m samples of z.
    kl:    KL(q(z|x) || p(z)) in nats, or None for a model without an encoder.
    elbo:  a lower bound on log p(x) in nats with every constant included (for decoder_only,
           the Monte-Carlo estimate log 1/m sum_i p(x|z_i), a bound in expectation).
    """

    loss: Tensor
    recon: Tensor
    kl: Tensor | None
    elbo: Tensor


class DiagonalGaussian:
    """q(z|x) = N(mu, diag exp(logvar)), each (B, d)."""

    def __init__(self, mu: Tensor, logvar: Tensor) -> None:
        self.mu = mu
        self.logvar = logvar

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self, m: int = 1) -> Tensor:
        """Reparameterised samples z = mu + sigma * eps, (m, B, d)."""
        eps = batch_randn((m, *self.mu.shape), 1, dtype=self.mu.dtype, device=self.mu.device)
        return self.mu + self.std * eps

    def mode(self) -> Tensor:
        return self.mu

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per image, (B,)."""
        return losses.gaussian_kl(self.mu, self.logvar)

    def kl_per_dim(self) -> Tensor:
        """KL(q_j || N(0, 1)) per image and latent dimension, (B, d)."""
        return losses.gaussian_kl_per_dim(self.mu, self.logvar)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z|x) for z of shape (..., B, d) -> (..., B)."""
        return losses.gaussian_log_prob(z, self.mu, self.logvar)


class GenerativeModel(nn.Module):
    """A decoder p(x|z) under the prior p(z) = N(0, I). Subclasses add the objective."""

    has_encoder: bool = False
    supports_kl_warmup: bool = False  # whether train.kl_warmup_steps reaches the objective
    # Whether the per-image terms depend on the rest of the batch (a statistic over the batch,
    # e.g. sigma_vae's variance): such a model cannot be split over torchrun processes exactly.
    batch_statistic: str | None = None

    def __init__(self, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.shape = tuple(shape)
        self.decoder = build_decoder(cfg, self.shape)
        # Set by the trainer before each step: the optimizer step (for schedules such as the
        # capacity of beta_vae_capacity) and the KL warm-up factor in [0, 1].
        self.step = 0
        self.kl_anneal = 1.0

    @property
    def num_dims(self) -> int:
        return math.prod(self.shape)

    # -- decoder likelihood -------------------------------------------------------------
    def mean(self, logits: Tensor) -> Tensor:
        """The decoder's mean in [0, 1] from its logits."""
        return torch.sigmoid(logits)

    def recon_terms(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(recon, nll) per image for x (B, C, H, W) and logits (m, B, C, H, W) -> (m, B) each.

        recon is -log p(x|z) without its constant, nll with it (nats).
        """
        m = logits.shape[0]
        flat_logits = logits.flatten(0, 1)
        flat_x = x.unsqueeze(0).expand_as(logits).flatten(0, 1)
        if self.cfg.likelihood == "bernoulli":
            nll = losses.bernoulli_nll(flat_x, flat_logits).view(m, -1)
            return nll, nll
        sigma2 = self.cfg.sigma2
        recon = losses.squared_error(flat_x, self.mean(flat_logits)).view(m, -1) / (2.0 * sigma2)
        return recon, recon + losses.gaussian_nll_constant(self.num_dims, sigma2)

    def bits_per_dim(self, elbo_nats: float) -> float:
        """Bits per dimension from a per-image log-likelihood (bound) in nats.

        Gaussian: a density on [0, 1]^K, so 8-bit data adds ln 256 per dimension (DESIGN.md).
        Bernoulli: a probability of binary pixels, so bits per binary pixel; only a likelihood
        when the data are binary (data.binarize=true).
        """
        if self.cfg.likelihood == "bernoulli":
            return -elbo_nats / (self.num_dims * math.log(2.0))
        return losses.bits_per_dim(elbo_nats, self.num_dims)

    # -- generation ---------------------------------------------------------------------
    def decode_logits(self, z: Tensor) -> Tensor:
        """z (..., d) -> logits (..., C, H, W), in fp32 even under bf16 autocast: the losses
        sum thousands of pixels, which bf16's 8-bit mantissa would round away."""
        lead = z.shape[:-1]
        logits = self.decoder(z.reshape(-1, z.shape[-1]))
        return losses.full_precision(logits).reshape(*lead, *self.shape)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1] for latents z (B, d) -> (B, C, H, W)."""
        return self.mean(self.decode_logits(z))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """n images (decoder means) for z ~ N(0, temperature^2 I), (n, C, H, W)."""
        device = next(self.parameters()).device
        z = temperature * torch.randn(n, self.cfg.latent_dim, device=device)
        return self.decode(z)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        raise NotImplementedError(f"model '{self.cfg.name}' has no encoder")

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """Importance log-weights log p(x|z_k) + log p(z_k) - log r(z_k|x) for k samples from a
        proposal r, (k, B); log p(x) ~= logmeanexp over k. Without an encoder the proposal is
        the prior, so the weights are log p(x|z_k), z_k ~ p(z)."""
        z = torch.randn(k, x.shape[0], self.cfg.latent_dim, device=x.device, dtype=x.dtype)
        return -self.recon_terms(x, self.decode_logits(z))[1]

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at the posterior mean: x (B, C, H, W) -> (B, C, H, W)."""
        return self.decode(self.encode(x).mode())

    def forward(self, x: Tensor) -> ModelOutput:
        raise NotImplementedError
