"""FactorVAE (Kim & Mnih 2018, "Disentangling by Factorising"): loss = recon + KL + gamma * TC,
the total correlation of the codes estimated by a discriminator.

The total correlation TC = KL(q(z) || prod_k q(z_k)) of the aggregate posterior measures how
far the code's dimensions are from independent. FactorVAE estimates it with the density-ratio
trick: a classifier D tells codes z ~ q(z) ("joint", class 0) from codes whose dimensions were
shuffled independently across the batch (draws of prod_k q(z_k), class 1).
At its optimum its log-odds are log q(z) - log prod_k q(z_k), so for each image

    tc_i = D(z_i)_0 - D(z_i)_1        (the two logits; their mean over the batch estimates TC)

and the VAE trains on recon + KL + gamma * tc. D trains on the cross-entropy of its two classes,
0.5 * (CE(D(z), joint) + CE(D(shuffled z), shuffled)), with its own Adam (``param_groups``: the
paper's lr 1e-4 and betas (0.5, 0.9)). Both happen in one backward pass: the loss of image i is

    recon_i + KL_i + gamma * tc_i + disc_i,

where tc_i goes through D with its weights held fixed (detached: its gradient reaches the
encoder, not D) and disc_i is D's cross-entropy on z_i and on row i of the shuffled codes, both
detached (its gradient reaches D only). The two parts therefore train disjoint parameter
groups, each by its own part's gradient, as the paper's two optimizers do. Two simplifications,
both as in disentanglement_lib's FactorVAE: the shuffled codes are the training batch's own
(the paper's algorithm draws a second batch for them), and D takes its step on the same batch
and at the same time as the VAE (the paper updates D after the VAE).

The shuffle mixes the rows of the whole global batch, so under torchrun each process gathers
every rank's codes (no gradient: D's inputs are detached), shuffles the global batch with the
noise one process would draw (``rng.global_batch_rand``) and keeps its own rows: two processes
train what one does. The noise comes from torch's generator, so resume is exact.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from vaelab import losses, rng
from vaelab.config import ModelConfig, TrainConfig, require
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian, StepContext
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class FactorVAEConfig(ModelConfig):
    name: str = "factor_vae"
    # weight on the discriminator's TC estimate; 35 is in the range disentanglement_lib's
    # study (Locatello et al. 2019) sweeps on dSprites (10-100)
    gamma: float = 35.0
    # hidden layers of the discriminator, an MLP on z with LeakyReLU(0.2) and 2 logits (the
    # paper's, its Appendix A: 6)
    disc_layers: int = 3
    disc_width: int = 512  # units per hidden layer of the discriminator (the paper's: 1000)
    disc_lr: float = 1e-4  # the discriminator's Adam learning rate (the paper's)
    disc_betas: tuple[float, ...] = (0.5, 0.9)  # its Adam betas (the paper's)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.gamma < math.inf, "model.gamma", "a finite number >= 0")
        require(self.disc_layers >= 1, "model.disc_layers", "an integer >= 1")
        require(self.disc_width >= 1, "model.disc_width", "an integer >= 1")
        require(0 < self.disc_lr < math.inf, "model.disc_lr", "a finite number > 0")
        require(
            len(self.disc_betas) == 2 and all(0 <= b < 1 for b in self.disc_betas),
            "model.disc_betas",
            "two numbers in [0, 1), e.g. [0.5, 0.9]",
        )


def discriminator(latent_dim: int, layers: int, width: int) -> nn.Sequential:
    """The MLP z (..., d) -> 2 logits (..., 2): ``layers`` hidden layers of ``width`` units,
    each a linear map and LeakyReLU(0.2); class 0 is "joint" (z ~ q(z)), 1 "shuffled"."""
    sizes = [latent_dim, *[width] * layers]
    parts: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        parts += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
    return nn.Sequential(*parts, nn.Linear(sizes[-1], 2))


def permute_dims(z: Tensor, noise: Tensor) -> Tensor:
    """Each latent dimension of z (m, B, d) shuffled independently across the batch: the
    dimension's rows in the order that sorts its uniform ``noise`` (m, B, d). The rows are then
    draws of prod_k q(z_k) (the paper's permute_dims)."""
    return z.gather(-2, noise.argsort(dim=-2, stable=True))


def global_codes(z: Tensor, rank: int, world: int, batch: int) -> Tensor:
    """The codes (m, batch, d) of the whole global batch from this rank's rows rank::world
    (m, b, d) of it, gathered from every rank (no gradient; a rank may hold one row fewer)."""
    most = -(-batch // world)
    padded = z.new_zeros(z.shape[0], most, z.shape[2])
    padded[:, : z.shape[1]] = z
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    whole = z.new_empty(z.shape[0], batch, z.shape[2])
    for r, part in enumerate(parts):
        whole[:, r::world] = part[:, : len(range(r, batch, world))]
    return whole


def shuffled_codes(z: Tensor, ctx: StepContext) -> Tensor:
    """This rank's rows of the global batch's codes z (m, B, d), each dimension shuffled across
    the global batch (``permute_dims``), detached: what one process would shuffle."""
    z = z.detach()
    where = rng.shard()  # (rank, world, global batch) under torchrun
    if where is None:
        if ctx.world_size > 1:
            raise RuntimeError("factor_vae under torchrun needs the batch's rng.noise_shard")
        return permute_dims(z, rng.global_batch_rand(tuple(z.shape), 1, device=z.device))
    rank, world, batch = where
    whole = global_codes(z, rank, world, batch)
    noise = rng.global_batch_rand(tuple(z.shape), 1, device=z.device)  # (m, batch, d)
    return permute_dims(whole, noise)[:, rank::world]


def cross_entropy(logits: Tensor, label: int) -> Tensor:
    """-log softmax(logits)[label] per row: logits (..., 2) -> (...)."""
    return -torch.log_softmax(logits, dim=-1)[..., label]


@register("factor_vae", FactorVAEConfig)
class FactorVAE(VAE):
    """Logs ``tc`` (the discriminator's estimate, per image), ``disc_loss`` (its cross-entropy,
    in the loss) and ``disc_acc`` (the share of its two guesses per image that are right; 0.5 is
    chance) beside ``recon`` and ``kl``; the reported ELBO is the plain -(nll + KL). KL warm-up
    and free bits apply to the KL as for vae; gamma weights the TC throughout."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
        super().__init__(cfg, shape)
        c: FactorVAEConfig = cfg  # type: ignore[assignment]
        self.discriminator = discriminator(c.latent_dim, c.disc_layers, c.disc_width)

    def param_groups(self, train: TrainConfig) -> list[dict[str, Any]]:
        """The VAE's parameters at train.lr with train's betas; the discriminator's at its own
        model.disc_lr and model.disc_betas: a second Adam."""
        cfg: FactorVAEConfig = self.cfg  # type: ignore[assignment]
        disc = list(self.discriminator.parameters())
        mine = {id(p) for p in disc}
        vae = [p for p in self.parameters() if id(p) not in mine]
        return [
            {"params": vae, "lr": train.lr},
            {"params": disc, "lr": cfg.disc_lr, "betas": tuple(cfg.disc_betas)},
        ]

    def objective(
        self,
        q: DiagonalGaussian,
        z: Tensor,
        recon: Tensor,
        nll: Tensor,
        ctx: StepContext,
        terms: dict[str, Tensor],
    ) -> Tensor:
        cfg: FactorVAEConfig = self.cfg  # type: ignore[assignment]
        # TC: D's log-odds of "joint" on the codes, through D's weights held fixed, so that its
        # gradient reaches the encoder only.
        fixed = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        logits = losses.full_precision(functional_call(self.discriminator, fixed, (z,)))
        tc = (logits[..., 0] - logits[..., 1]).mean(0)  # (B,)
        # D's loss on the detached codes (class 0) and shuffled codes (class 1), one pass: its
        # gradient reaches D only.
        joint = z.detach()
        both = self.discriminator(torch.cat([joint, shuffled_codes(z, ctx)], dim=-2))
        on_joint, on_shuffled = losses.full_precision(both).split(joint.shape[-2], dim=-2)
        disc = 0.5 * (cross_entropy(on_joint, 0) + cross_entropy(on_shuffled, 1)).mean(0)
        right = (on_joint[..., 0] > on_joint[..., 1]).to(disc.dtype) + (
            on_shuffled[..., 1] > on_shuffled[..., 0]
        ).to(disc.dtype)
        terms.update(tc=tc, disc_loss=disc, disc_acc=0.5 * right.mean(0))
        return super().objective(q, z, recon, nll, ctx, terms) + cfg.gamma * tc + disc
