"""Tiny runs for the `vaelab serve` tests: a vae and a decoder_only trained for one epoch on a
folder of 40 small RGB pictures, so the server finds the runs' validation images on disk."""

from __future__ import annotations

from pathlib import Path

import vaelab
from vaelab.config import load_config
from vaelab.data.synthetic import write_images


def make_runs(root: Path) -> dict[str, Path]:
    images = root / "images"
    write_images(images, [f"{i:03d}.png" for i in range(40)], size=(24, 20))
    runs = {}
    for name in ("vae", "decoder_only"):
        cfg = load_config(
            overrides=[
                "data.name=folder", f"data.root={images}", "data.size=8",
                f"data.cache_dir={root / 'cache'}", "data.workers=1", "data.val_fraction=0.25",
                "model.widths=[4,8]", "model.latent_dim=3", "train.batch_size=16",
                "train.epochs=1", "train.progress=false", f"model.name={name}",
            ]
        )  # fmt: skip
        runs[name] = Path(vaelab.train(cfg, root / name))
    return runs


def make_cvae_run(root: Path) -> Path:
    """A cvae conditioned on the digits' labels (0..9), one epoch on 200 of the embedded digits
    at 8x8: its validation images carry labels."""
    cfg = load_config(
        overrides=[
            "model.name=cvae", "data.subset=200", "data.size=8", f"data.cache_dir={root / 'cache'}",
            "model.widths=[4,8]", "model.latent_dim=3", "train.batch_size=16", "train.epochs=1",
            "train.progress=false",
        ]
    )  # fmt: skip
    return Path(vaelab.train(cfg, root / "cvae"))
