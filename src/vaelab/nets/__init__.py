"""Encoder and decoder architectures, built from the image shape (C, H, W).

An encoder maps images (B, C, H, W) to features (B, out_dim); a decoder maps latents (B, d) to
per-pixel logits (B, C, H, W). No losses and no sampling live here: the model decides what the
numbers mean (mean and log-variance, Bernoulli logits, a Gaussian mean through a sigmoid).
"""

from __future__ import annotations

from torch import nn

from vaelab.config import ModelConfig
from vaelab.nets.conv import ConvDecoder, ConvEncoder
from vaelab.nets.mlp import MLPDecoder, MLPEncoder

Shape = tuple[int, int, int]


def build_encoder(cfg: ModelConfig, shape: Shape, out_dim: int) -> nn.Module:
    if cfg.net == "conv":
        return ConvEncoder(shape, cfg.widths, out_dim)
    return MLPEncoder(shape, cfg.widths, out_dim)


def build_decoder(cfg: ModelConfig, shape: Shape) -> nn.Module:
    if cfg.net == "conv":
        return ConvDecoder(shape, cfg.widths, cfg.latent_dim, cfg.upsample)
    return MLPDecoder(shape, cfg.widths, cfg.latent_dim)


__all__ = [
    "ConvDecoder",
    "ConvEncoder",
    "MLPDecoder",
    "MLPEncoder",
    "build_decoder",
    "build_encoder",
]
