"""Model registry: each variant registers itself by name with its config class.

``build(cfg, shape)`` makes the model that ``cfg.name`` names. Adding a variant is one small
file that subclasses a model, overrides a hook, and calls ``register``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from vaelab.config import MODEL_CONFIGS, ModelConfig
from vaelab.models.base import DiagonalGaussian, GenerativeModel, ModelOutput

MODELS: dict[str, type[GenerativeModel]] = {}
M = TypeVar("M", bound=type[GenerativeModel])


def register(name: str, config_class: type[ModelConfig]) -> Callable[[M], M]:
    """Class decorator: make ``name`` buildable and let the config check its own fields."""

    def wrap(cls: M) -> M:
        if name in MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        MODELS[name] = cls
        MODEL_CONFIGS[name] = config_class
        return cls

    return wrap


def build(cfg: ModelConfig, shape: tuple[int, int, int]) -> GenerativeModel:
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model '{cfg.name}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[cfg.name](cfg, shape)


# Importing the variants registers them.
from vaelab.models import (  # noqa: E402, F401
    beta_vae,
    beta_vae_capacity,
    decoder_only,
    iwae,
    sigma_vae,
    vae,
)

__all__ = ["MODELS", "DiagonalGaussian", "GenerativeModel", "ModelOutput", "build", "register"]
