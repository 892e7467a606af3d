"""beta-VAE (Higgins et al. 2017): loss = recon + beta * KL.

For the Gaussian decoder, beta is the same as choosing the decoder variance sigma_x^2 = beta/2:
a larger beta buys a simpler latent code (lower rate) at the price of reconstruction (higher
distortion). The reported ELBO is always the unweighted one (beta = 1), so runs compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vaelab.config import ModelConfig, require
from vaelab.models import register
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class BetaVAEConfig(ModelConfig):
    name: str = "beta_vae"
    beta: float = 4.0  # weight on the KL term (Higgins et al. convention)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.beta < math.inf, "model.beta", "a finite number >= 0")


@register("beta_vae", BetaVAEConfig)
class BetaVAE(VAE):
    def kl_weight(self) -> float:
        return self.cfg.beta
