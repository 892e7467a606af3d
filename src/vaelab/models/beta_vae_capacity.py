"""beta-VAE with a controlled capacity (Burgess et al. 2018, "Understanding disentangling in
beta-VAE"): loss = recon + gamma * |KL - C|, with C rising linearly from 0 to C_max.

The target C lets the code take in information gradually instead of being squeezed by a
constant beta. The paper penalises |mean_batch KL - C|; here each image's term is
gamma * sign(mean_batch KL - C) * (KL_i - C), whose batch mean is exactly that penalty (and
whose gradient is the paper's), so the loss stays a per-image vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab.config import ModelConfig, RunConfig, require, unused
from vaelab.models import register
from vaelab.models.base import StepContext, refuse_split
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class BetaVAECapacityConfig(ModelConfig):
    name: str = "beta_vae_capacity"
    gamma: float = 100.0  # weight of |KL - C|
    capacity_max: float = 25.0  # C_max in nats
    capacity_steps: int = 100_000  # optimizer steps over which C rises from 0 to C_max

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.gamma < math.inf, "model.gamma", "a finite number >= 0")
        require(0 <= self.capacity_max < math.inf, "model.capacity_max", "a number >= 0")
        require(self.capacity_steps >= 1, "model.capacity_steps", "an integer >= 1")
        unused(self, "free_bits", "its capacity C sets the KL")


def capacity(cfg: BetaVAECapacityConfig, step: int) -> float:
    """C at optimizer step ``step``: capacity_max * min(1, step / capacity_steps)."""
    return cfg.capacity_max * min(1.0, step / cfg.capacity_steps)


@register("beta_vae_capacity", BetaVAECapacityConfig)
class BetaVAECapacity(VAE):
    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        super().check_run(cfg, world_size)
        refuse_split(cfg, world_size, "its penalty uses the batch-mean KL")

    def kl_penalty(self, kl_dims: Tensor, ctx: StepContext) -> Tensor:
        kl = kl_dims.sum(-1)  # (B,)
        c = capacity(self.cfg, ctx.step)  # type: ignore[arg-type]
        sign = torch.sign(kl.mean() - c).detach()
        return ctx.kl_anneal * self.cfg.gamma * sign * (kl - c)  # type: ignore[attr-defined]
