"""Pictures of a run as PNG files: what `vaelab sample|reconstruct|interpolate|traverse` do.

Each function checks its arguments and its output file first (``rundir.check_output``: never
one of a run's own files, nor an existing file vaelab did not write unless ``overwrite``), then
loads the model and the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vaelab import conditions, data, rundir, samplers
from vaelab.checkpoint import load, run_config
from vaelab.config import ConfigError
from vaelab.models.base import GenerativeModel
from vaelab.report import pictures
from vaelab.report.figures import MAX_GRID_SIDE, grid_size, save_grid


def run_data(run: str | Path, overrides: list[str] | None = None) -> data.Splits:
    """The data a run was trained on, checked against what its model read from it (a cvae's
    labels); ``overrides`` may change data.* keys only (e.g. data.root, to point at another
    copy)."""
    for text in overrides or []:
        if not text.strip().startswith("data."):
            raise data.DataError(f"'{text}': only data.* keys can change here")
    cfg = run_config(run, overrides)
    splits = data.build(cfg.data)
    conditions.check_data(cfg.model, splits)
    return splits


def run_split(
    run: str | Path,
    split: str = "val",
    overrides: list[str] | None = None,
    splits: data.Splits | None = None,
) -> data.ImageDataset:
    """A split of ``splits``, by default the data a run was trained on (``run_data``)."""
    splits = run_data(run, overrides) if splits is None else splits
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    if split not in parts:
        raise data.DataError(f"split '{split}': expected train, val or test")
    if parts[split] is None:
        name = run_config(run, overrides).data.name
        raise data.DataError(f"split '{split}': data.name={name} has no {split} split")
    return parts[split]  # type: ignore[return-value]


def _label(run: str | Path, model: GenerativeModel) -> str:
    return f"{Path(run).name} ({model.cfg.name})"


def _count(option: str, value: Any) -> int:
    """A count given on the command line: an integer >= 1 (a ConfigError naming the option)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}: expected an integer >= 1, got {value!r}")
    return value


def _positive(option: str, value: Any) -> float:
    """A finite number > 0 given on the command line."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{option}: expected a finite number > 0, got {value!r}")
    return float(value)


def _check_fits(
    model: GenerativeModel, n: int, nrow: int, rows: str, cols: str, group: int = 0
) -> None:
    """Refuse, before drawing, a grid of n images that no PNG could hold (``rows`` and
    ``cols`` name the options that set its height and width)."""
    height, width = grid_size(n, nrow, model.shape[1:], group=group)
    for side, option in ((height, rows), (width, cols)):
        if side > MAX_GRID_SIDE:
            raise ConfigError(
                f"{option}: the grid would be {height}x{width} pixels of "
                f"{model.shape[1]}x{model.shape[2]} images, expected at most {MAX_GRID_SIDE} a "
                "side; ask for fewer images"
            )


def draw_samples(
    run: str | Path,
    out: str | Path,
    n: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    *,
    sampler: str = "prior",
    components: int = samplers.COMPONENTS,
    condition: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """A grid of ``n`` samples: z from the prior N(0, T^2 I), or (``sampler`` "gmm") from a
    Gaussian mixture of ``components`` fitted to the training codes, saved with the run
    (``vaelab.samplers.gmm``). A conditional model (cvae) samples under conditions drawn from
    the training images that have the values ``condition`` fixes ("NAME=VALUE" each,
    ``conditions.parse``), all of them when it fixes none."""
    _count("-n", n)
    _count("--components", components)
    _positive("--temperature", temperature)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise ConfigError(f"--seed: expected an integer from -2^63 to 2^64 - 1, got {seed!r}")
    if sampler not in samplers.KINDS:
        raise ConfigError(
            f"--sampler: expected one of {', '.join(samplers.KINDS)}, got {sampler!r}"
        )
    out = rundir.check_output(out, overwrite=overwrite)
    model = load(run)
    _check_fits(model, n, 8, "-n", "-n")
    if condition and not model.conditions:
        raise ConfigError(
            f"--condition: model '{model.cfg.name}' is not conditional (a cvae run is)"
        )
    fixed = conditions.parse(condition, model.conditions) if model.conditions else None
    fitted = sampler == "gmm" or not model.continuous_latent  # a sampler fitted to the codes
    splits = run_data(run) if fitted or model.conditions else None
    train = None if splits is None else splits.train
    mixture = None
    if splits is not None and fitted:
        mixture = samplers.latent_sampler(run, model, sampler, splits.train, splits.val, components)
    if sampler == "gmm":
        what = f"z ~ a {components}-Gaussian mixture on the codes, T = {temperature:g}"
    elif fitted:  # vq_vae: its codes from the prior fitted to them
        what = f"codes ~ the autoregressive code prior, T = {temperature:g}"
    else:
        what = f"z ~ N(0, {temperature:g}^2 I)"
    if model.conditions:
        what += f", given {' '.join(condition)}" if condition else ", labels of training images"
    images = pictures.samples(model, n, temperature, seed, mixture, train, fixed)
    title = f"{_label(run, model)}: {n} samples, {what}"
    save_grid(images, out, nrow=8, title=title)
    return out


def draw_reconstructions(
    run: str | Path, out: str | Path, n: int = 32, split: str = "val", *, overwrite: bool = False
) -> Path:
    _count("-n", n)
    out = rundir.check_output(out, overwrite=overwrite)
    model = load(run)
    dataset = run_split(run, split)
    _check_fits(model, 2 * min(n, len(dataset)), 8, "-n", "-n", group=2)
    images, caption = pictures.reconstructions(model, dataset, n)
    save_grid(images, out, nrow=8, title=f"{_label(run, model)}: {caption}", group=2)
    return out


def draw_interpolations(
    run: str | Path, out: str | Path, pairs: int = 6, steps: int = 10, *, overwrite: bool = False
) -> Path:
    _count("--pairs", pairs)
    _count("--steps", steps)
    out = rundir.check_output(out, overwrite=overwrite)
    model = load(run)
    val = run_split(run)
    _check_fits(model, min(pairs, len(val) // 2) * steps, steps, "--pairs", "--steps")
    images = pictures.interpolations(model, val, pairs, steps)
    title = f"{_label(run, model)}: latent interpolations between pairs of val images"
    save_grid(images, out, nrow=steps, title=title)
    return out


def draw_traversal(
    run: str | Path,
    out: str | Path,
    dims: int = 8,
    steps: int = 9,
    limit: float = 3.0,
    *,
    overwrite: bool = False,
) -> Path:
    _count("--dims", dims)
    _count("--steps", steps)
    _positive("--limit", limit)
    out = rundir.check_output(out, overwrite=overwrite)
    model = load(run)
    _check_fits(model, min(dims, model.cfg.latent_dim) * steps, steps, "--dims", "--steps")
    val = run_split(run)
    chosen = pictures.active_dimensions(model, val, dims)
    images = pictures.traversal(model, val, chosen, steps, limit)
    title = f"{_label(run, model)}: rows = latent dims {chosen}, values {-limit:g}..{limit:g}"
    save_grid(images, out, nrow=steps, title=title)
    return out
