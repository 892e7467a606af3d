"""Fully connected encoder/decoder: hidden sizes from ``widths``, mirrored in the decoder."""

from __future__ import annotations

import itertools
import math

from torch import Tensor, nn


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], widths: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        self.net = _mlp([math.prod(shape), *widths, out_dim])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))  # (B, C, H, W) -> (B, out_dim)


class MLPDecoder(nn.Module):
    def __init__(
        self, shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int
    ) -> None:
        super().__init__()
        self.shape = shape
        self.net = _mlp([latent_dim, *reversed(widths), math.prod(shape)])

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.shape)  # logits, (B, C, H, W)
