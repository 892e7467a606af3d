"""sigma-VAE (Rybkin et al. 2021, "Simple and Effective VAE Training with Calibrated
Decoders"): the Gaussian decoder's variance is learned, not fixed.

One variance is shared by all pixels and set to its analytic optimum given the batch:
sigma*^2 = mean over the batch, the samples and the pixels of (x - f(z))^2, the value that
minimises the Gaussian negative log-likelihood. The balance between reconstruction and KL,
which beta tunes by hand (beta = 2 sigma_x^2 for a fixed-variance decoder), is then found from
the data. Because sigma* depends on the batch, so do the per-image training terms. The model keeps
a running value of sigma*^2 over the training batches (``likelihoods.LearnedGaussian``), saved
with its weights: evaluation scores every image under that one variance, and runs log it as the
term ``sigma2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vaelab.config import ModelConfig, RunConfig, require, unused
from vaelab.models import likelihoods, register
from vaelab.models.base import refuse_split
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class SigmaVAEConfig(ModelConfig):
    name: str = "sigma_vae"
    min_sigma2: float = 1e-6  # a floor for sigma*^2: a batch reconstructed perfectly stays finite

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.likelihood == "gaussian", "model.likelihood", "gaussian for sigma_vae")
        unused(self, "sigma2", "it sets the decoder variance from each batch's squared error")
        require(0 < self.min_sigma2 < math.inf, "model.min_sigma2", "a finite number > 0")


@register("sigma_vae", SigmaVAEConfig)
class SigmaVAE(VAE):
    def build_likelihood(self) -> likelihoods.Likelihood:
        return likelihoods.LearnedGaussian(self.cfg.min_sigma2)  # type: ignore[attr-defined]

    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        super().check_run(cfg, world_size)
        refuse_split(
            cfg, world_size, "its decoder variance is the mean squared error over the batch"
        )
