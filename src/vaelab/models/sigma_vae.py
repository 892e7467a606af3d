"""sigma-VAE (Rybkin et al. 2021, "Simple and Effective VAE Training with Calibrated
Decoders"): the Gaussian decoder's variance is learned, not fixed.

One variance is shared by all pixels and set to its analytic optimum given the batch:
sigma*^2 = mean over the batch, the samples and the pixels of (x - f(z))^2, the value that
minimises the Gaussian negative log-likelihood. The balance between reconstruction and KL,
which beta tunes by hand (beta = 2 sigma_x^2 for a fixed-variance decoder), is then found from
the data. Because sigma* depends on the batch, so do the per-image terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from vaelab import losses
from vaelab.config import ModelConfig, require, unused
from vaelab.models import register
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


def optimal_sigma2(squared_errors: Tensor, num_dims: int, floor: float) -> Tensor:
    """argmin over sigma^2 of sum_i [sse_i / (2 sigma^2) + K/2 log(2 pi sigma^2)]: the mean
    squared error per pixel, sum_i sse_i / (n K), floored."""
    return (squared_errors.mean() / num_dims).clamp_min(floor)


@register("sigma_vae", SigmaVAEConfig)
class SigmaVAE(VAE):
    batch_statistic = "its decoder variance is the mean squared error over the batch"

    def recon_terms(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        m = logits.shape[0]
        flat_x = x.unsqueeze(0).expand_as(logits).flatten(0, 1)
        sse = losses.squared_error(flat_x, self.mean(logits.flatten(0, 1))).view(m, -1)
        sigma2 = optimal_sigma2(sse, self.num_dims, self.cfg.min_sigma2)  # type: ignore[attr-defined]
        # recon: everything but K/2 log(2 pi); with a learned variance log sigma^2 is no constant.
        recon = sse / (2.0 * sigma2) + 0.5 * self.num_dims * sigma2.log()
        return recon, recon + 0.5 * self.num_dims * losses.LOG_2PI
