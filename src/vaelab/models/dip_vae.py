"""DIP-VAE-I and -II (Kumar et al. 2018, "Variational Inference of Disentangled Latent Concepts
from Unlabeled Observations"): the VAE's loss plus lambda_od * sum_{i != j} Cov_ij^2 +
lambda_d * sum_i (Cov_ii - 1)^2, pushing the codes' covariance towards the identity.

Cov is the covariance of the aggregate posterior q(z) = E_x q(z|x), estimated on the batch:
DIP-VAE-I matches only the covariance of the posterior means, Cov_x[mu(x)] (the paper's
eq. 6); DIP-VAE-II the whole of it, Cov_x[mu(x)] + E_x[diag sigma^2(x)] (eq. 7). Both are
taken over the batch's B images with 1/B (the population covariance, as disentanglement_lib
computes it). The penalty is one number per batch; adding it to every image's loss makes the
batch mean of the loss (what the trainer minimises) the VAE's loss plus the penalty. It is
logged as the term ``dip``, the same value for each image of a batch. As a batch statistic it
would be computed on each torchrun process's share, so torchrun is refused.

Defaults as in disentanglement_lib's unsupervised study (Locatello et al. 2019, "Challenging
Common Assumptions in the Unsupervised Learning of Disentangled Representations"), which
implements these two equations: lambda_d = 10 lambda_od for DIP-VAE-I and lambda_d = lambda_od
for DIP-VAE-II (its ``lambda_d_factor``), with lambda_od swept over 1-50; here lambda_od = 10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab.config import ModelConfig, RunConfig, require
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian, StepContext, refuse_split
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class DIPVAEIConfig(ModelConfig):
    name: str = "dip_vae_i"
    lambda_od: float = 10.0  # weight on the squared off-diagonal covariances
    lambda_d: float = 100.0  # weight on the squared distance of the variances from 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.lambda_od < math.inf, "model.lambda_od", "a finite number >= 0")
        require(0 <= self.lambda_d < math.inf, "model.lambda_d", "a finite number >= 0")


@dataclass(frozen=True)
class DIPVAEIIConfig(DIPVAEIConfig):
    name: str = "dip_vae_ii"
    lambda_od: float = 10.0  # weight on the squared off-diagonal covariances
    lambda_d: float = 10.0  # weight on the squared distance of the variances from 1


def batch_covariance(mu: Tensor) -> Tensor:
    """The covariance of the rows of mu (B, d) with 1/B: (d, d)."""
    centred = mu - mu.mean(0)
    return centred.T @ centred / mu.shape[0]


def dip_penalty(cov: Tensor, lambda_od: float, lambda_d: float) -> Tensor:
    """lambda_od * sum_{i != j} Cov_ij^2 + lambda_d * sum_i (Cov_ii - 1)^2, a scalar."""
    diag = torch.diagonal(cov)
    off_diagonal = cov - torch.diag(diag)
    return lambda_od * off_diagonal.square().sum() + lambda_d * (diag - 1).square().sum()


@register("dip_vae_i", DIPVAEIConfig)
class DIPVAEI(VAE):
    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        super().check_run(cfg, world_size)
        refuse_split(cfg, world_size, "its penalty is the covariance of the batch's codes")

    def covariance(self, q: DiagonalGaussian) -> Tensor:
        """The batch estimate of the covariance the penalty matches to I: Cov[mu(x)], (d, d)."""
        return batch_covariance(q.mu)

    def objective(
        self,
        q: DiagonalGaussian,
        z: Tensor,
        recon: Tensor,
        nll: Tensor,
        ctx: StepContext,
        terms: dict[str, Tensor],
    ) -> Tensor:
        cfg: DIPVAEIConfig = self.cfg  # type: ignore[assignment]
        dip = dip_penalty(self.covariance(q), cfg.lambda_od, cfg.lambda_d).expand(q.mu.shape[0])
        terms["dip"] = dip
        return super().objective(q, z, recon, nll, ctx, terms) + dip


@register("dip_vae_ii", DIPVAEIIConfig)
class DIPVAEII(DIPVAEI):
    def covariance(self, q: DiagonalGaussian) -> Tensor:
        """Cov[mu(x)] + E[diag sigma^2(x)] over the batch: the covariance of q(z), (d, d)."""
        return batch_covariance(q.mu) + torch.diag(q.logvar.exp().mean(0))
