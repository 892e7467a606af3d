"""The VAE (Kingma & Welling 2014): Gaussian encoder, reparameterised z, closed-form KL."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vaelab import losses
from vaelab.config import ModelConfig
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian, GenerativeModel, ModelOutput
from vaelab.nets import build_encoder


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    name: str = "vae"


@register("vae", VAEConfig)
class VAE(GenerativeModel):
    has_encoder = True
    supports_kl_warmup = True

    def __init__(self, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
        super().__init__(cfg, shape)
        self.encoder = build_encoder(cfg, self.shape, 2 * cfg.latent_dim)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mu, logvar = losses.full_precision(self.encoder(x)).chunk(2, dim=-1)  # (B, d) each
        return DiagonalGaussian(mu, logvar)

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x): (k, B) (Burda et al. 2016)."""
        q = self.encode(x)
        z = q.rsample(k)  # (k, B, d)
        nll = self.recon_terms(x, self.decode_logits(z))[1]
        return -nll + losses.standard_normal_log_prob(z) - q.log_prob(z)

    # -- hooks: a variant overrides one of these ---------------------------------------------
    def kl_weight(self) -> float:
        """The weight on KL in the training loss; 1 gives the ELBO (beta-VAE overrides it)."""
        return 1.0

    def kl_penalty(self, kl_dims: Tensor) -> Tensor:
        """The KL part of the training loss from the per-dimension KL (B, d) -> (B,).

        Free bits (model.free_bits) and KL warm-up (train.kl_warmup_steps, through
        ``self.kl_anneal``) apply here, so every variant that keeps this hook gets them.
        """
        kl = losses.free_bits_kl(kl_dims, self.cfg.free_bits)
        return self.kl_anneal * self.kl_weight() * kl

    def objective(self, q: DiagonalGaussian, z: Tensor, recon: Tensor, nll: Tensor) -> Tensor:
        """The per-image training loss from the posterior, its samples z (m, B, d) and the
        reconstruction terms per sample (m, B). Default: recon + KL penalty (the ELBO's
        negative, up to a constant, when beta = 1)."""
        return recon.mean(0) + self.kl_penalty(q.kl_per_dim())

    def forward(self, x: Tensor) -> ModelOutput:
        q = self.encode(x)
        z = q.rsample(self.cfg.mc_samples)  # (m, B, d)
        logits = self.decode_logits(z)  # (m, B, C, H, W)
        recon, nll = self.recon_terms(x, logits)  # (m, B) each
        kl = q.kl()
        return ModelOutput(
            loss=self.objective(q, z, recon, nll),
            recon=recon.mean(0),
            kl=kl,
            elbo=-(nll.mean(0) + kl),
        )
