"""Conditions: the labels a conditional model (``cvae``) is given with each image.

A condition is a tuple of named categorical variables that the data already has
(``model.condition_on``):

- ``label``: the class (digits, Fashion-MNIST), one variable "label" with values 0..K-1;
- ``attributes``: CelebA's 40 binary attributes, one variable each, 0 (absent: -1 in the
  attribute file) or 1 (present);
- ``factors``: the shapes data's generative factors, one variable each, an index 0..size-1.

The variables and their sizes are read from the data when training starts and recorded in the
run's config as ``model.conditions`` ("name:size" each), so the model is built without the data.
A model is given its condition as integer indices (B, V), one column per variable, through
``GenerativeModel.given(y)``; it one-hot encodes them itself. Every loop over a dataset that
runs a conditional model (the trainer, the evaluation pass, the report's pictures, sampling)
wraps each batch in ``given(model, dataset, index)``, and sampling draws whole conditions from
the data (``draw``): the variables a user fixes (``--condition Smiling=1``) are held, the rest
come from the images that have those values, so samples follow the data's joint distribution.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from vaelab.config import ConfigError, ModelConfig
from vaelab.data import ImageDataset, Splits
from vaelab.models.base import GenerativeModel

KINDS = ("label", "attributes", "factors")
MAX_CLASSES = 1000  # more distinct labels than this are identities, not classes
Variables = tuple[tuple[str, int], ...]


def variables(dataset: ImageDataset, kind: str) -> Variables:
    """The variables of ``kind`` that ``dataset`` has, (name, number of values) each; a
    ConfigError naming model.condition_on when it has none."""
    present = {
        "label": dataset._labels is not None,
        "attributes": bool(dataset._attributes),
        "factors": dataset._factors is not None,
    }
    if present.get(kind) and kind == "label":
        labels = dataset._labels
        classes = len(np.unique(labels))
        if labels.min() < 0 or classes > MAX_CLASSES:
            raise ConfigError(
                "config key 'model.condition_on': the data's labels are not classes to "
                f"condition on ({classes:,} values, from {labels.min()}; CelebA's are "
                "identities): expected attributes or factors"
            )
        return (("label", int(labels.max()) + 1),)
    if present.get(kind) and kind == "attributes":
        return tuple((name, 2) for name in dataset._attributes)
    if present.get(kind):
        return tuple(zip(dataset.factor_names, dataset.factor_sizes, strict=True))
    has = [k for k, found in present.items() if found]
    raise ConfigError(
        f"config key 'model.condition_on': the data has no {kind}; expected one of: "
        f"{', '.join(has) if has else 'none (these images carry no labels to condition on)'}"
    )


def check_data(model: ModelConfig, splits: Splits) -> None:
    """Refuse (one-line ConfigError) data whose labels are not the ones a loaded run's model
    was trained on (``model.conditions``), split by split: the check training makes
    (``complete_config``); nothing for a model without conditions."""
    from vaelab.models import MODELS

    if not getattr(model, "conditions", ()):
        return
    for part in (splits.train, splits.val, splits.test):
        if part is not None:
            MODELS[model.name].complete_config(model, part)


def spec(found: Variables) -> tuple[str, ...]:
    """The ``model.conditions`` value that records ``found``: "name:size" each."""
    return tuple(f"{name}:{size}" for name, size in found)


def parse_spec(values: Sequence[str]) -> Variables:
    """``model.conditions`` back to (name, size) pairs; a ConfigError naming the key."""
    out = []
    for value in values:
        name, _, size = str(value).rpartition(":")
        if not name or not size.isdigit() or int(size) < 2:
            raise ConfigError(
                f"config key 'model.conditions': expected 'name:size' entries with size >= 2, "
                f"got {value!r}"
            )
        out.append((name, int(size)))
    if len({n for n, _ in out}) != len(out):
        raise ConfigError("config key 'model.conditions': a variable is named twice")
    return tuple(out)


def indices(dataset: ImageDataset, kind: str, index: np.ndarray | slice) -> np.ndarray:
    """The condition of the images at positions ``index`` of ``dataset``: (B, V) int64."""
    rows = dataset.rows[index]
    if kind == "label":
        return dataset._labels[rows].astype(np.int64)[:, None]
    if kind == "attributes":
        return np.stack([dataset._attributes[n][rows] > 0 for n in dataset._attributes], 1).astype(
            np.int64
        )
    return dataset._factors[rows].astype(np.int64)


def given(
    model: GenerativeModel,
    dataset: ImageDataset,
    index: np.ndarray | slice,
    *others: GenerativeModel | None,
) -> contextlib.AbstractContextManager[None]:
    """Give ``model`` (and ``others``, copies of it such as the sampling form) the condition of
    the images at positions ``index`` of ``dataset``; nothing for a model without conditions."""
    if not model.conditions:
        return contextlib.nullcontext()
    y = torch.from_numpy(indices(dataset, model.condition_on, index))
    return _all(y, model, *others)  # on the CPU: the model checks it there, then moves it


def held(
    model: GenerativeModel, y: Tensor | None, n: int
) -> contextlib.AbstractContextManager[None]:
    """Give ``model`` one condition y (V,) for a batch of n images; nothing for a model without
    conditions (or without y)."""
    if not model.conditions or y is None:
        return contextlib.nullcontext()
    return model.given(y[None].expand(n, -1))


def drawn(
    model: GenerativeModel,
    dataset: ImageDataset | None,
    n: int,
    fixed: dict[int, int] | None = None,
    seed: int = 0,
) -> contextlib.AbstractContextManager[None]:
    """Give ``model`` n conditions drawn from ``dataset`` (``draw``), for sampling n images;
    nothing for a model without conditions. A ValueError when a conditional model has no data
    to draw them from."""
    if not model.conditions:
        return contextlib.nullcontext()
    if dataset is None:
        raise ValueError(f"model '{model.cfg.name}' is conditional: its samples need the data")
    return _all(draw(dataset, model.condition_on, n, fixed, seed), model)


@contextlib.contextmanager
def _all(y: Tensor, *held: GenerativeModel | None) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for m in held:
            if m is not None:
                stack.enter_context(m.given(y))
        yield


def parse(pairs: Sequence[str], known: Variables, what: str = "--condition") -> dict[int, int]:
    """``--condition name=value`` options to {variable position: value}; a ConfigError naming
    the option (``what``: how the caller's user wrote it). A value is a plain integer; an
    attribute's may be written 1 (present) or 0 / -1 (absent). A variable named twice is
    refused."""
    names = [n for n, _ in known]
    fixed: dict[int, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        shown = _shown(pair)  # the message stays one short line, whatever was sent
        if not sep or name not in names:
            raise ConfigError(
                f"{what} {shown}: expected NAME=VALUE with NAME one of: {', '.join(names)}"
            )
        i = names.index(name)
        size = known[i][1]
        v = int(value) if re.fullmatch(r"-?[0-9]{1,9}", value) else -2
        if size == 2 and v == -1:
            v = 0
        if not 0 <= v < size:
            raise ConfigError(
                f"{what} {shown}: expected an integer from 0 to {size - 1} for {name}"
            )
        if i in fixed:
            raise ConfigError(f"{what} {shown}: {name} is given a value twice")
        fixed[i] = v
    return fixed


def _shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message: control characters escaped, cut at ``limit``."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def typical(dataset: ImageDataset | None, known: Variables, kind: str) -> list[int]:
    """The most common value of each variable among ``dataset``'s images (0 for every variable
    without a dataset): a condition to start from where the user has not chosen one."""
    if dataset is None or len(dataset) == 0:
        return [0] * len(known)
    table = indices(dataset, kind, slice(None))
    counts = [np.bincount(table[:, i], minlength=size) for i, (_, size) in enumerate(known)]
    return [int(c.argmax()) for c in counts]


def draw(
    dataset: ImageDataset, kind: str, n: int, fixed: dict[int, int] | None = None, seed: int = 0
) -> Tensor:
    """n conditions (n, V) drawn from the images of ``dataset`` that have the ``fixed`` values
    (all images when none are fixed): the data's joint distribution of the variables given
    those values. A ConfigError when no image has them."""
    table = indices(dataset, kind, slice(None))
    keep = np.ones(len(table), bool)
    for i, v in (fixed or {}).items():
        keep &= table[:, i] == v
    if not keep.any():
        raise ConfigError("--condition: no image of the data has these values together")
    rows = np.flatnonzero(keep)
    pick = np.random.default_rng(seed).choice(rows, n, replace=len(rows) < n)
    return torch.from_numpy(table[pick])
