"""The conditional VAE (Sohn et al. 2015, "Learning Structured Output Representation using Deep
Conditional Generative Models"): q(z | x, y), p(x | z, y) and p(z) = N(0, I), so

    log p(x | y) >= E_q[log p(x | z, y)] - KL(q(z | x, y) || p(z)),

the VAE's bound with the condition y given to both networks. y is the labels the data already
has (``model.condition_on``: the class, CelebA's attributes or the shapes factors;
``vaelab.conditions``), one-hot encoded per variable and concatenated: the encoder sees it as
constant extra image channels (so any registered net pair works unchanged), the decoder as extra
inputs beside z. The prior does not depend on y (the form used for class-conditional
generation; Sohn et al. also learn p(z | y), which a prior object could add).

Every number of a cvae run is conditional: the ELBO, importance sampling and AIS estimate
log p(x | y) of each image given its own labels. Samples take a condition from the data
(``vaelab sample RUN --condition label=7``; the variables not fixed are drawn from the images
that have the fixed values).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vaelab.conditions import KINDS, Variables, parse_spec, spec, variables
from vaelab.config import ConfigError, ModelConfig, RunConfig, require
from vaelab.data import ImageDataset
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian
from vaelab.models.vae import VAE
from vaelab.nets import build_decoder, build_encoder


@dataclass(frozen=True)
class CVAEConfig(ModelConfig):
    name: str = "cvae"
    condition_on: str = "label"  # label | attributes | factors: which labels of the data
    # the condition's variables, "name:size" each: filled from the data when training starts
    # (and checked against it on resume); leave empty
    conditions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.condition_on in KINDS, "model.condition_on", f"one of {', '.join(KINDS)}")
        parse_spec(self.conditions)


@register("cvae", CVAEConfig)
class CVAE(VAE):
    cfg: CVAEConfig

    def __init__(self, cfg: CVAEConfig, shape: tuple[int, int, int]) -> None:
        if not cfg.conditions:
            raise ConfigError(
                "config key 'model.conditions': empty; training fills it from the data "
                "(model.condition_on), so build a cvae from a run or a trained config"
            )
        super().__init__(cfg, shape)
        self._y: Tensor | None = None  # the one-hot condition inside ``given``

    @functools.cached_property  # over the base's class attribute: parsed once from the config
    def conditions(self) -> Variables:
        return parse_spec(self.cfg.conditions)

    @property
    def condition_on(self) -> str:
        return self.cfg.condition_on

    @functools.cached_property
    def condition_width(self) -> int:
        """The one-hot condition's length: the variables' sizes added up."""
        return sum(size for _, size in self.conditions)

    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        """The VAE's checks; and a left-right flip would contradict factors such as a position."""
        super().check_run(cfg, world_size)
        if cfg.data.flip and cfg.model.condition_on == "factors":
            raise ConfigError(
                "config key 'data.flip': a flipped image no longer has its factors (position, "
                "orientation); expected false with model.condition_on=factors"
            )

    @classmethod
    def complete_config(cls, cfg: CVAEConfig, train: ImageDataset) -> ModelConfig:
        """model.conditions from the training data (checked against it when already set)."""

        found = spec(variables(train, cfg.condition_on))
        if not cfg.conditions:
            return replace(cfg, conditions=found)
        if tuple(cfg.conditions) != found:
            raise ConfigError(
                f"config key 'model.conditions': says {list(cfg.conditions)}, but the data has "
                f"{list(found)} (model.condition_on={cfg.condition_on})"
            )
        return cfg

    def make_encoder(self) -> nn.Module:
        c, h, w = self.shape
        return build_encoder(self.cfg, (c + self.condition_width, h, w), 2 * self.cfg.latent_dim)

    def make_decoder(self) -> nn.Module:
        wide = replace(self.cfg, latent_dim=self.cfg.latent_dim + self.condition_width)
        return build_decoder(wide, self.shape)

    @contextlib.contextmanager
    def given(self, y: Tensor) -> Iterator[None]:
        """Condition everything inside the block on y (B, V): integer indices, one column per
        variable of ``conditions``."""
        known = self.conditions
        if y.dim() != 2 or y.shape[1] != len(known) or y.dtype.is_floating_point:
            raise ValueError(
                f"cvae: expected the condition as integer indices (B, {len(known)}), got "
                f"{tuple(y.shape)} {y.dtype}"
            )
        y = y.long()
        if y.device.type == "cpu":  # the loops hand it over on the CPU: checked without a sync
            sizes = torch.tensor([s for _, s in known])
            if ((y < 0) | (y >= sizes)).any():
                raise ValueError(
                    f"cvae: a condition value is out of range (sizes {sizes.tolist()})"
                )
        param = next(self.parameters())
        y = y.to(param.device)
        onehot = torch.cat([F.one_hot(y[:, i], s) for i, (_, s) in enumerate(known)], dim=1)
        before, self._y = self._y, onehot.to(param.device, param.dtype)
        try:
            yield
        finally:
            self._y = before

    def _condition(self, batch: int) -> Tensor:
        if self._y is None:
            raise ValueError(
                "cvae: no condition given; wrap the call in `with model.given(y):` "
                "(vaelab.conditions)"
            )
        if self._y.shape[0] != batch:
            raise ValueError(
                f"cvae: the condition is for {self._y.shape[0]} images, the batch has {batch}"
            )
        return self._y

    def encode(self, x: Tensor) -> DiagonalGaussian:
        y = self._condition(x.shape[0]).to(x.dtype)
        planes = y[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return super().encode(torch.cat([x, planes], dim=1))

    def decode_logits(self, z: Tensor) -> Tensor:
        """z (..., B, d) with the batch's condition (B, c) beside every z; one z (d,) with a
        condition of one image."""
        if z.dim() == 1:
            return self.decode_logits(z[None])[0]
        y = self._condition(z.shape[-2]).to(z.dtype)
        return super().decode_logits(torch.cat([z, y.expand(*z.shape[:-1], -1)], dim=-1))
