"""Pictures of a run as PNG files: what `vaelab sample|reconstruct|interpolate|traverse` do."""

from __future__ import annotations

from pathlib import Path

from vaelab import data
from vaelab.checkpoint import load
from vaelab.config import load_config
from vaelab.models.base import GenerativeModel
from vaelab.report import pictures
from vaelab.report.figures import save_grid


def run_split(
    run: str | Path, split: str = "val", overrides: list[str] | None = None
) -> data.ImageDataset:
    """A split of the data a run was trained on; ``overrides`` may change data.* keys only
    (e.g. data.root, to point at another copy)."""
    for text in overrides or []:
        if not text.strip().startswith("data."):
            raise data.DataError(f"'{text}': only data.* keys can change here")
    cfg = load_config(Path(run) / "config.yaml", overrides)
    splits = data.build(cfg.data)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    if split not in parts:
        raise data.DataError(f"split '{split}': expected train, val or test")
    if parts[split] is None:
        raise data.DataError(f"split '{split}': data.name={cfg.data.name} has no {split} split")
    return parts[split]  # type: ignore[return-value]


def _label(run: str | Path, model: GenerativeModel) -> str:
    return f"{Path(run).name} ({model.cfg.name})"


def draw_samples(
    run: str | Path, out: str | Path, n: int = 64, temperature: float = 1.0, seed: int = 0
) -> Path:
    model = load(run)
    images = pictures.samples(model, n, temperature, seed)
    title = f"{_label(run, model)}: {n} samples, z ~ N(0, {temperature:g}^2 I)"
    save_grid(images, out, nrow=8, title=title)
    return Path(out)


def draw_reconstructions(run: str | Path, out: str | Path, n: int = 32, split: str = "val") -> Path:
    model = load(run)
    images, caption = pictures.reconstructions(model, run_split(run, split), n)
    save_grid(images, out, nrow=8, title=f"{_label(run, model)}: {caption}", group=2)
    return Path(out)


def draw_interpolations(run: str | Path, out: str | Path, pairs: int = 6, steps: int = 10) -> Path:
    model = load(run)
    images = pictures.interpolations(model, run_split(run), pairs, steps)
    title = f"{_label(run, model)}: latent interpolations between pairs of val images"
    save_grid(images, out, nrow=steps, title=title)
    return Path(out)


def draw_traversal(
    run: str | Path, out: str | Path, dims: int = 8, steps: int = 9, limit: float = 3.0
) -> Path:
    model = load(run)
    val = run_split(run)
    chosen = pictures.active_dimensions(model, val, dims)
    images = pictures.traversal(model, val, chosen, steps, limit)
    title = f"{_label(run, model)}: rows = latent dims {chosen}, values {-limit:g}..{limit:g}"
    save_grid(images, out, nrow=steps, title=title)
    return Path(out)
