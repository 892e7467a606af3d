"""Model registry: each variant registers itself by name, with its config class.

``build(cfg, shape)`` makes the model that ``cfg.name`` names. Adding a variant is one small
file (in vaelab or in your own code) that subclasses ``GenerativeModel`` or ``VAE``, returns its
terms from ``forward(x, ctx)``, and is decorated with ``@register(name)`` (docs/extending.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from vaelab.config import MODEL_CONFIGS, ConfigError, ModelConfig
from vaelab.machine import available_memory
from vaelab.models.base import DiagonalGaussian, GenerativeModel, ModelOutput, StepContext
from vaelab.nets import file_digest

MODELS: dict[str, type[GenerativeModel]] = {}
M = TypeVar("M", bound=type[GenerativeModel])


@dataclass(frozen=True)
class Source:
    """Where a model defined outside vaelab comes from: the Python file that registered it and
    that file's sha256 (None for one registered outside a file), which a run records."""

    file: Path | None
    sha256: str | None


# Model name -> the source of a model defined outside the vaelab package (built-ins: absent).
SOURCES: dict[str, Source] = {}


def register(name: str, config_class: type[ModelConfig] = ModelConfig) -> Callable[[M], M]:
    """Class decorator: make the model buildable as ``model.name=<name>``, configured by
    ``config_class`` (a frozen dataclass subclassing ModelConfig, for a model with settings of
    its own; its ``__post_init__`` checks them). For a class defined outside vaelab, the file
    that calls ``register`` (where ``@register`` decorates the class, the file defining it) is
    the plugin a run of this model records (``vaelab train --plugin FILE``), as for a net.
    Registering the same class again is fine; another class under a taken name is a
    ValueError."""
    if not (isinstance(config_class, type) and issubclass(config_class, ModelConfig)):
        raise TypeError(f"register('{name}'): the config class must subclass ModelConfig")
    frame = inspect.currentframe()
    caller = frame.f_back.f_globals.get("__file__") if frame and frame.f_back else None
    file = Path(caller).resolve() if caller else None  # the plugin: the file registering it

    def wrap(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
            raise TypeError(f"register('{name}'): expected a GenerativeModel subclass, got {cls!r}")
        same = (cls.__module__, cls.__qualname__)  # the same class, imported again
        if name in MODELS and (MODELS[name].__module__, MODELS[name].__qualname__) != same:
            raise ValueError(f"model '{name}' is registered twice")
        MODELS[name] = cls
        MODEL_CONFIGS[name] = config_class
        if _built_in(cls):
            SOURCES.pop(name, None)
        else:
            SOURCES[name] = Source(file, file_digest(file))
        return cls

    return wrap


def _built_in(cls: type) -> bool:
    return cls.__module__ == "vaelab" or cls.__module__.startswith("vaelab.")


def plugin_record(name: str) -> dict[str, str] | None:
    """What a run of ``model.name=<name>`` records about the plugin that defines the model
    (``{"model", "file", "sha256"}``, the file by name only: runs move between machines); None
    for a built-in model."""
    if name not in MODELS or name not in SOURCES:
        return None
    source = SOURCES[name]
    record = {"model": name, "file": source.file.name if source.file else ""}
    return {**record, "sha256": source.sha256} if source.sha256 else record


def build(cfg: ModelConfig, shape: tuple[int, int, int]) -> GenerativeModel:
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model '{cfg.name}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[cfg.name](cfg, shape)


# Bytes per parameter: fp32 weights; training adds their gradients and Adam's two moments.
PARAM_BYTES = 4
TRAINING_COPIES = 4


def build_meta(cfg: ModelConfig, shape: tuple[int, int, int]) -> GenerativeModel:
    """The model of ``cfg`` built on the meta device: its parameters' names and shapes, and no
    memory. A ConfigError naming the keys if even that fails (sizes past what torch can index)."""
    try:
        with torch.device("meta"):
            return build(cfg, shape)
    except (RuntimeError, ValueError, OverflowError) as err:
        raise ConfigError(
            f"{_keys(cfg, shape)}: cannot build this model "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
        ) from None


def _keys(cfg: ModelConfig, shape: tuple[int, ...]) -> str:
    size = "x".join(str(s) for s in shape)
    return (
        f"model.widths={list(cfg.widths)}, model.latent_dim={cfg.latent_dim} for {size} images "
        "(data.channels x data.size x data.size)"
    )


def check_size(
    cfg: ModelConfig,
    shape: tuple[int, int, int],
    training: bool = False,
    device: str | torch.device = "cpu",
    *,
    bytes_per_value: int = PARAM_BYTES,
) -> int:
    """Refuse, before any memory is allocated, a model too large for this machine: its
    parameters (counted on the meta device), ``bytes_per_value`` each (4: fp32; 8 for
    train.precision=fp64), four copies when ``training`` (weights, gradients, Adam's two
    moments), against the memory available (a CUDA device's free memory for ``device`` on
    CUDA). Returns the number of parameters. A ConfigError names model.widths,
    model.latent_dim and data.size, with the GB needed and available."""
    model = build_meta(cfg, shape)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    need = bytes_per_value * (params * (TRAINING_COPIES if training else 1) + buffers)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        have: int | None = torch.cuda.mem_get_info(device)[0]
        where = f"free on {device}"
    else:
        have, where = available_memory(), "of memory available"
    if have is not None and need > have:
        kind = f"{8 * bytes_per_value}-bit values"
        what = (
            f"to train (weights, gradients and Adam's two moments, {kind})"
            if training
            else f"to hold ({kind})"
        )
        raise ConfigError(
            f"{_keys(cfg, shape)}: {params:,} parameters, {need / 1e9:,.1f} GB {what}, more than "
            f"the {have / 1e9:,.1f} GB {where}; expected smaller model.widths, model.latent_dim "
            "or data.size"
        )
    return params


# Importing the variants registers them.
from vaelab.models import (  # noqa: E402, F401
    beta_tcvae,
    beta_vae,
    beta_vae_capacity,
    cvae,
    decoder_only,
    dip_vae,
    factor_vae,
    iaf_vae,
    iwae,
    sigma_vae,
    vae,
    vamp_vae,
    vq_vae,
)
from vaelab.models.vae import VAE  # noqa: E402  (the base class of variants with an encoder)

__all__ = [
    "MODELS",
    "SOURCES",
    "VAE",
    "DiagonalGaussian",
    "GenerativeModel",
    "ModelOutput",
    "Source",
    "StepContext",
    "available_memory",
    "build",
    "build_meta",
    "check_size",
    "plugin_record",
    "register",
]
