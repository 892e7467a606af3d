"""beta-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in Variational
Autoencoders"): loss = recon + alpha * MI + beta * TC + gamma * dimKL, the KL taken apart.

The KL averaged over the data splits into three parts (the paper's decomposition), q(z) the
aggregate posterior, the mixture of q(z|x_n) over the N training images:

    E_x KL(q(z|x) || p(z)) = I_q(x; z)                          index-code mutual information
                           + KL(q(z) || prod_k q(z_k))          total correlation
                           + sum_k KL(q(z_k) || p(z_k))         dimension-wise KL

q(z) is estimated on the batch by minibatch-weighted sampling (MWS, as in the paper and its
code, rtqichen/beta-tcvae): for z_i ~ q(z|x_i) in a batch of M images drawn from N,

    log q(z_i)   ~= logsumexp_j log q(z_i | x_j) - log(N M)
    log q(z_ik)  ~= logsumexp_j log q(z_ik | x_j) - log(N M)    for each dimension k,

so each image's three terms are MI_i = log q(z_i|x_i) - log q(z_i), TC_i = log q(z_i) -
sum_k log q(z_ik) and dimKL_i = sum_k log q(z_ik) - log p(z_i). They add up to
log q(z_i|x_i) - log p(z_i), the one-sample estimate of the KL (the MWS estimates cancel), so
alpha = beta = gamma = 1 trains on the ELBO. The estimates depend on the rest of the batch:
torchrun would compute them on each process's share, and is refused.

The MWS estimate of q(z) weights M densities by 1/(N M) each, so it integrates to 1/N, not 1:
MI, TC and dimKL carry the constants +log N, +(d - 1) log N and -d log N (exactly these when
every q(z|x) is the prior, where all three are 0 in truth). Constants leave the gradients as
they are, and runs with the same N and d compare; the logged values are not the divergences
themselves. Memory: a B x B x d matrix per sample of z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab import losses
from vaelab.config import ModelConfig, RunConfig, require, unused
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian, StepContext, refuse_split
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class BetaTCVAEConfig(ModelConfig):
    name: str = "beta_tcvae"
    alpha: float = 1.0  # weight on the index-code mutual information (the paper's alpha)
    # weight on the total correlation; 6 is what the paper's code runs for dSprites
    # (rtqichen/beta-tcvae README: vae_quant.py --dataset shapes --beta 6 --tcvae)
    beta: float = 6.0
    gamma: float = 1.0  # weight on the dimension-wise KL (the paper's gamma)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.alpha < math.inf, "model.alpha", "a finite number >= 0")
        require(0 <= self.beta < math.inf, "model.beta", "a finite number >= 0")
        require(0 <= self.gamma < math.inf, "model.gamma", "a finite number >= 0")
        unused(self, "free_bits", "its KL terms are batch estimates, not the closed-form KL")


def log_density_matrix(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log q(z_ik | x_j) for every sample i, image j and dimension k: z (..., B, d) with mu and
    logvar (B, d) -> (..., B_i, B_j, d)."""
    diff = z.unsqueeze(-2) - mu  # (..., B, 1, d) - (B, d) -> (..., B, B, d)
    return -0.5 * (losses.LOG_2PI + logvar + diff.square() * torch.exp(-logvar))


def kl_decomposition(
    z: Tensor, mu: Tensor, logvar: Tensor, dataset_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The MWS estimates (MI, TC, dimKL) of each sample z_i ~ q(z|x_i), z (..., B, d), with the
    batch's posterior mu, logvar (B, d) and N = ``dataset_size`` training images; each
    (..., B), in nats. Their sum is log q(z_i|x_i) - log p(z_i)."""
    log_norm = math.log(dataset_size * mu.shape[0])  # log(N M)
    mat = log_density_matrix(z, mu, logvar)  # (..., B_i, B_j, d)
    log_qz_x = losses.gaussian_log_prob(z, mu, logvar)  # log q(z_i|x_i), (..., B)
    log_qz = torch.logsumexp(mat.sum(-1), dim=-1) - log_norm  # log q(z_i)
    log_prod_qzk = (torch.logsumexp(mat, dim=-2) - log_norm).sum(-1)  # sum_k log q(z_ik)
    log_pz = losses.standard_normal_log_prob(z)
    return log_qz_x - log_qz, log_qz - log_prod_qzk, log_prod_qzk - log_pz


@register("beta_tcvae", BetaTCVAEConfig)
class BetaTCVAE(VAE):
    """Logs ``mi``, ``tc`` and ``dim_kl`` (per image, averaged over the model.mc_samples draws
    of z) beside ``recon`` and the closed-form ``kl``; the reported ELBO is the plain one. KL
    warm-up (train.kl_warmup_steps) scales the three terms together.

    N, the training set's size, comes from ``ctx.dataset_size`` (the trainer and evaluation
    set it); without it (0: a plain ``model(x)``) N is the batch size, as if the batch were the
    whole data set."""

    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        super().check_run(cfg, world_size)
        refuse_split(cfg, world_size, "its MI, TC and dimension-wise KL are batch estimates")

    def objective(
        self,
        q: DiagonalGaussian,
        z: Tensor,
        recon: Tensor,
        nll: Tensor,
        ctx: StepContext,
        terms: dict[str, Tensor],
    ) -> Tensor:
        cfg: BetaTCVAEConfig = self.cfg  # type: ignore[assignment]
        n = ctx.dataset_size or q.mu.shape[0]
        mi, tc, dim_kl = (t.mean(0) for t in kl_decomposition(z, q.mu, q.logvar, n))
        terms.update(mi=mi, tc=tc, dim_kl=dim_kl)
        return recon.mean(0) + ctx.kl_anneal * (cfg.alpha * mi + cfg.beta * tc + cfg.gamma * dim_kl)
