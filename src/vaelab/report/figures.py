"""Figures written as PNG with matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from vaelab.checkpoint import atomic_write
from vaelab.metrics import is_number
from vaelab.models.base import RESERVED

# The panels every run's curves have, with their titles; every other term a model logs in
# metrics.jsonl gets a panel of its own, titled by its name.
PANELS = (
    ("recon", "reconstruction: -log p(x|z) + const"),
    ("kl", "KL(q(z|x) || p(z))"),
    ("loss", "training loss"),
)


def panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The curves' panels for these metrics rows: PANELS, then each other numeric term in the
    order the rows first name it."""
    out, known = list(PANELS), {key for key, _ in PANELS} | RESERVED
    for row in rows:
        for key, value in row.items():
            if key not in known and is_number(value):
                out.append((key, key))
                known.add(key)
    return out


# Grids larger than this many pixels a side are refused before drawing: the figure is about
# 2.75 times larger (and matplotlib's limit is 2^16 pixels a side).
MAX_GRID_SIDE = 5000
# The PNG text chunk "Software: vaelab" (rundir.PNG_MARK), written before the image data: it
# lets a rerun replace vaelab's own pictures while refusing to replace anyone else's.
PNG_METADATA = {"Software": "vaelab"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata=PNG_METADATA)
    return buf.getvalue()


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """``curves_png`` written to ``path``."""
    atomic_write(path, curves_png(rows, title))


def curves_png(rows: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """Train and val curves per epoch: reconstruction, KL, loss and every other term the model
    logs, each in its own panel (``panels``), as logged in metrics.jsonl (per image)."""
    shown_panels = panels(rows)
    fig = Figure(figsize=(4.35 * len(shown_panels), 3.6))
    axes = fig.subplots(1, len(shown_panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, shown_panels, strict=True):
        shown = False
        for split, style in (("train", "o-"), ("val", "s--")):
            pts = [
                (r["epoch"], r[key])
                for r in rows
                if r["split"] == split and isinstance(r.get(key), int | float)
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=split, markersize=3)
                shown = True
        if shown:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no such term\n(no encoder)", ha="center", va="center",
                    transform=ax.transAxes, color="gray")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image" if key in dict(PANELS) else "per image")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def rate_distortion_png(points: Sequence[tuple[str, float, float]], title: str = "") -> bytes:
    """Rate (KL, nats) against distortion (-E_q[log p(x|z)] with its constants, nats) of
    runs, each labelled.

    Dashed lines are iso-ELBO lines: distortion + rate = -ELBO. Points further down-left are
    better ELBOs; moving along a line trades one term for the other at the same ELBO.
    """
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    d = np.array([p[1] for p in points], dtype=float)
    r = np.array([p[2] for p in points], dtype=float)
    lo, hi = float((d + r).min()), float((d + r).max())
    span = max(hi - lo, 1e-9)
    xmin, xmax = d.min() - 0.15 * (np.ptp(d) + 1), d.max() + 0.15 * (np.ptp(d) + 1)
    ymin, ymax = r.min() - 0.15 * (np.ptp(r) + 1), r.max() + 0.15 * (np.ptp(r) + 1)
    for level in np.linspace(lo - 0.25 * span, hi + 0.25 * span, 6):
        xs = np.linspace(xmin, xmax, 50)
        ax.plot(xs, level - xs, "--", color="0.8", linewidth=0.8, zorder=0)
    ax.plot(d, r, "o-", color="C0")
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(max(ymin, 0.0), ymax)  # KL is never negative
    ax.set_xlabel("distortion: -E[log p(x|z)] with constants (nats per image)")
    ax.set_ylabel("rate: KL(q(z|x) || p(z)) (nats per image)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "rate-distortion (dashed: distortion + rate = -ELBO)")
    fig.tight_layout()
    return _png(fig)


def gap_png(results: Sequence[tuple[str, dict[str, Any]]], title: str = "") -> bytes:
    """The ELBO gap of each run taken apart (``vaelab.gap``): one stacked bar per run, in nats
    per image above its ELBO(q): the amortization gap ELBO(q*) - ELBO(q) below, the
    approximation gap log p(x) - ELBO(q*) on top, so the bar's height is log p(x) (AIS) minus
    ELBO(q); a black tick marks the IW bound; error bars are 3 standard errors of the
    estimates (the "noise" of eval/gap_<split>.json). ``results``: (label, that file's content)
    for runs with an encoder (others have no ELBO to take apart)."""
    if not results:
        raise ValueError("gap_png needs at least one run with an encoder")
    fig = Figure(figsize=(1.6 + 1.3 * len(results), 4.2))
    ax = fig.add_subplot()
    xs = np.arange(len(results))
    amort = np.array([r["amortization_gap"] for _, r in results], dtype=float)
    approx = np.array([r["approximation_gap"] for _, r in results], dtype=float)
    iw = np.array([r["iw_bound"] - r["elbo_q"] for _, r in results], dtype=float)
    noise = [r.get("noise", {}) for _, r in results]
    err = 3 * np.array([n.get("approximation_gap", 0.0) for n in noise], dtype=float)
    ax.bar(xs, amort, 0.6, color="C1", label="amortization gap: ELBO(q*) - ELBO(q)")
    ax.bar(xs, approx, 0.6, bottom=amort, color="C0", yerr=err, capsize=4,
           label="approximation gap: log p(x) - ELBO(q*)")  # fmt: skip
    ax.hlines(iw, xs - 0.3, xs + 0.3, colors="black", linewidth=2,
              label="IW bound - ELBO(q)")  # fmt: skip
    for x, a, b in zip(xs, amort, approx, strict=True):
        ax.annotate(f"{a + b:.2f}", (x, a + b), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)  # fmt: skip
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xticks(xs, [label for label, _ in results])
    ax.set_ylabel("nats per image above ELBO(q)")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylim(min(0.0, float(amort.min()), float((amort + approx).min())) * 1.1,
                max(float((amort + approx + err).max()), float(iw.max()), 0.1) * 1.45)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "the ELBO gap, log p(x) (AIS) - ELBO(q), taken apart")
    fig.tight_layout()
    return _png(fig)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8, rounded."""
    return (images.detach().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, nrow: int, pad: int = 2, group: int = 0) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> one (H', W', C) uint8 array, ``nrow`` images per row;
    ``group`` > 0 leaves a wider gap after every ``group`` rows (pairs of images above
    reconstructions)."""
    imgs = to_uint8(images)
    n, h, w, c = imgs.shape
    rows = math.ceil(n / nrow)
    gap = 3 * pad
    extra = gap * ((rows - 1) // group) if group else 0
    grid = np.full((rows * (h + pad) + pad + extra, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        y = pad + r * (h + pad) + (gap * (r // group) if group else 0)
        x = pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def grid_size(
    n: int, nrow: int, image: Sequence[int], pad: int = 2, group: int = 0
) -> tuple[int, int]:
    """(height, width) in pixels of the ``image_grid`` of n images of size ``image`` (H, W)."""
    rows = math.ceil(n / nrow)
    extra = 3 * pad * ((rows - 1) // group) if group else 0
    return rows * (image[0] + pad) + pad + extra, nrow * (image[1] + pad) + pad


def grid_png(images: Tensor, nrow: int = 8, title: str = "", group: int = 0) -> bytes:
    """An image grid with a title, as PNG bytes."""
    return _grid_figure(image_grid(images, nrow, group=group), title)


def save_grid(
    images: Tensor, path: str | Path, nrow: int = 8, title: str = "", group: int = 0
) -> None:
    """``grid_png`` written to ``path``."""
    atomic_write(path, grid_png(images, nrow, title, group))


def _grid_figure(grid: np.ndarray, title: str) -> bytes:
    h, w, c = grid.shape
    fig = Figure(figsize=(w / 40 + 0.4, h / 40 + 0.6))
    ax = fig.add_subplot()
    ax.imshow(
        grid[..., 0] if c == 1 else grid,
        cmap="gray" if c == 1 else None,
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _png(fig)


def save_overview(
    columns: dict[str, list[tuple[str, Tensor, int]]], path: str | Path, title: str = ""
) -> None:
    """Models side by side: one column per model, each a list of (caption, images (N, C, H, W),
    row group as in ``image_grid``)."""
    names = list(columns)
    n_rows = max(len(c) for c in columns.values())
    fig = Figure(figsize=(3.6 * len(names), 3.7 * n_rows))
    axes = fig.subplots(n_rows, len(names), squeeze=False)
    for col, name in enumerate(names):
        for row in range(n_rows):
            ax = axes[row][col]
            ax.set_axis_off()
            if row >= len(columns[name]):
                continue
            caption, images, group = columns[name][row]
            grid = image_grid(images, nrow=8, group=group)
            ax.imshow(
                grid[..., 0] if grid.shape[2] == 1 else grid,
                cmap="gray",
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
            ax.set_title(f"{name}: {caption}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, _png(fig))
