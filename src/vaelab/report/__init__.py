"""Figures of runs (curves, image grids), what a model draws, and the HTML report."""

from vaelab.report.figures import (
    curves_png,
    grid_png,
    image_grid,
    plot_curves,
    save_grid,
    save_overview,
)

__all__ = ["curves_png", "grid_png", "image_grid", "plot_curves", "save_grid", "save_overview"]
