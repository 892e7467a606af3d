"""Figures of runs: loss curves, image grids. (The HTML report builds on this room.)"""

from vaelab.report.figures import (
    image_grid,
    plot_curves,
    save_grid,
    save_overview,
    save_reconstructions,
)

__all__ = ["image_grid", "plot_curves", "save_grid", "save_overview", "save_reconstructions"]
