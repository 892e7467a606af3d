"""The importance-weighted autoencoder (Burda et al. 2016): trains on the K-sample bound

    L_K = E[log 1/K sum_k p(x, z_k) / q(z_k|x)],  z_k ~ q(z|x),

which is the ELBO for K = 1 and rises towards log p(x) as K grows. K is model.mc_samples
(default 5 here). The reported ``elbo`` stays the ordinary ELBO, so runs compare; the training
loss is -L_K. KL warm-up and free bits do not apply to this objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vaelab import losses
from vaelab.config import ModelConfig, unused
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian, GenerativeModel, StepContext
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class IWAEConfig(ModelConfig):
    name: str = "iwae"
    mc_samples: int = 5  # K importance samples per image

    def __post_init__(self) -> None:
        super().__post_init__()
        unused(self, "free_bits", "its bound has no separate KL term")


@register("iwae", IWAEConfig)
class IWAE(VAE):
    check_run = GenerativeModel.check_run  # no KL weight to warm up

    def objective(
        self,
        q: DiagonalGaussian,
        z: Tensor,
        recon: Tensor,
        nll: Tensor,
        ctx: StepContext,
        terms: dict[str, Tensor],
    ) -> Tensor:
        log_w = -nll + losses.standard_normal_log_prob(z) - q.log_prob(z)  # (K, B)
        return -losses.iw_bound(log_w)
