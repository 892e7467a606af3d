"""Data sources by name: ``build(DataConfig)`` returns the train/val(/test) splits.

Each source is a module with ``build(cfg) -> Splits``; registering one is one line in SOURCES.
"""

from __future__ import annotations

from collections.abc import Callable

from vaelab.config import DataConfig
from vaelab.data import mnist5k
from vaelab.data.base import DataError, ImageDataset, Splits, stratified_split

SOURCES: dict[str, Callable[[DataConfig], Splits]] = {
    "mnist5k": mnist5k.build,
}


def build(cfg: DataConfig) -> Splits:
    if cfg.name not in SOURCES:
        known = ", ".join(sorted(SOURCES))
        raise DataError(
            f"config key 'data.name': unknown data source '{cfg.name}' (known: {known})"
        )
    return SOURCES[cfg.name](cfg)


__all__ = ["SOURCES", "DataError", "ImageDataset", "Splits", "build", "stratified_split"]
