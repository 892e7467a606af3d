"""The demo: the derivation's three experiments on the embedded MNIST digits, in minutes.

decoder_only collapses to the average digit, the VAE learns, beta-VAE (beta = 4) trades
reconstruction for a smaller KL. Each is an ordinary run directory (so `vaelab.load` works on
it); the demo adds figures and one summary.json that puts the numbers side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from vaelab import data, rundir
from vaelab.checkpoint import atomic_write, load, read_metrics
from vaelab.config import load_config
from vaelab.evaluate import evaluate
from vaelab.report import pictures, plot_curves, save_grid, save_overview
from vaelab.report.html import write_report
from vaelab.trainer import resume, train

# The shared settings, then what each experiment changes. Kept small enough for 2 CPU cores.
COMMON = [
    "data.name=mnist5k",
    "model.net=conv",
    "model.widths=[32,64]",
    "model.latent_dim=16",
    "train.lr_schedule=cosine",
]
EXPERIMENTS: dict[str, list[str]] = {
    "decoder_only": ["model.name=decoder_only"],
    "vae": ["model.name=vae"],
    "beta_vae": ["model.name=beta_vae", "model.beta=4"],
}
DEMO_EPOCHS = 15
DEMO_IW_SAMPLES = 50  # importance samples per val image; `vaelab evaluate` defaults to 1000
REPORT_TITLE = "vaelab demo: decoder-only, VAE and beta-VAE (beta = 4) on 5,000 MNIST digits"
OVERVIEW_TITLE = (
    "decoder-only collapses to the average digit; the VAE learns; "
    "beta = 4 trades detail for a smaller KL"
)


SUMMARY, OVERVIEW, REPORT = rundir.SUMMARY, "overview.png", "report.html"


def check_demo_folder(out: str | Path) -> Path:
    """The demo's folder: missing, empty, or one the demo wrote (its three runs, overview.png,
    report.html, summary.json). Anything else in it is the user's, and the demo refuses."""
    out = rundir.folder_arg(out)
    if out.exists() and not out.is_dir():
        raise rundir.RunDirError(f"'{out}' exists and is not a folder")
    if not out.is_dir():
        return out
    for entry in sorted(out.iterdir()):
        name = entry.name
        if rundir.is_lock_file(entry):
            continue
        if name in EXPERIMENTS and entry.is_dir():
            ours = rundir.is_run(entry) or not any(entry.iterdir())
        elif name in (OVERVIEW, REPORT):
            ours = entry.is_file() and rundir.written_by_vaelab(entry)
        elif name == SUMMARY:
            ours = entry.is_file() and _is_summary(entry)
        else:
            ours = False
        if not ours:
            raise rundir.RunDirError(
                f"'{out}' holds '{name}', which the demo did not write: the demo needs an empty "
                "or missing folder, or one of its own; choose another --out"
            )
    return out


def _is_summary(path: Path) -> bool:
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(summary, dict) and set(summary) <= set(EXPERIMENTS)


def write_figures(
    run_dir: str | Path, val: data.ImageDataset
) -> tuple[dict[str, Path], list[tuple[str, torch.Tensor, int]]]:
    """Loss curves, a reconstruction grid and 64 prior samples into RUN/figures/.

    Returns the paths and, for the side-by-side overview, the images drawn.
    """
    run_dir = Path(run_dir)
    model = load(run_dir)
    name = model.cfg.name
    paths = {
        k: run_dir / rundir.FIGURES / f"{k}.png" for k in ("curves", "reconstructions", "samples")
    }
    plot_curves(read_metrics(run_dir), paths["curves"], title=f"{name}: per-image terms (nats)")
    pairs, caption = pictures.reconstructions(model, val)
    save_grid(pairs, paths["reconstructions"], title=f"{name}: {caption}", group=2)
    drawn = pictures.samples(model)
    save_grid(drawn, paths["samples"], title=f"{name}: 64 samples from the prior")
    return paths, [("64 samples from the prior", drawn, 0), (caption, pairs, 2)]


def run_demo(
    out: str | Path = "runs/demo",
    epochs: int = DEMO_EPOCHS,
    progress: bool = True,
    iw_samples: int = DEMO_IW_SAMPLES,
) -> dict[str, Any]:
    """Train the three experiments into OUT/<model>, evaluate each on val, and write figures,
    OUT/overview.png, OUT/report.html and OUT/summary.json.

    Re-running skips finished runs and resumes interrupted ones. ``out`` must be missing,
    empty, or a folder the demo wrote; it is locked while the demo runs.
    """
    out = check_demo_folder(out)
    with rundir.lock(out, what="running the demo"):
        return _run_demo(out, epochs, progress, iw_samples)


def _run_demo(out: Path, epochs: int, progress: bool, iw_samples: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    panels: dict[str, list[tuple[str, torch.Tensor, int]]] = {}
    splits = None
    for name, extra in EXPERIMENTS.items():
        start = time.perf_counter()
        overrides = [*COMMON, *extra, f"train.epochs={epochs}", f"train.progress={progress}"]
        cfg = load_config(overrides=overrides)
        splits = splits or data.build(cfg.data)
        run_dir = out / name
        if (run_dir / rundir.CONFIG).is_file():
            resume(run_dir, [f"train.epochs={epochs}"], splits=splits)
        else:
            train(cfg, run_dir, splits=splits)
        figures, panels[name] = write_figures(run_dir, splits.val)
        ev = evaluate(run_dir, "val", iw_samples, progress=progress, splits=splits)
        val = [r for r in read_metrics(run_dir) if r["split"] == "val"][-1]
        summary[name] = {
            "diversity_ratio": ev["diversity_ratio"],
            "val_loss": val["loss"],
            "val_recon": val["recon"],
            "val_kl": val.get("kl"),
            "val_elbo_nats": val["elbo_nats"],
            "val_bpd": val["bpd"],
            "iw_nll_nats": ev["iw_nll_nats"],
            "elbo_gap_nats": ev.get("elbo_gap_nats"),
            "active_units": ev.get("active_units"),
            "iw_samples": iw_samples,
            "epochs": val["epoch"],
            "train_seconds": val["seconds"],
            "seconds": round(time.perf_counter() - start, 2),
            "run": str(run_dir),
            "figures": {k: str(p) for k, p in figures.items()},
        }
        if hasattr(cfg.model, "beta"):
            summary[name]["beta"] = cfg.model.beta
    save_overview(panels, out / OVERVIEW, title=OVERVIEW_TITLE)
    write_report([out / name for name in EXPERIMENTS], out / REPORT, title=REPORT_TITLE)
    atomic_write(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small text table."""
    head = (
        f"{'model':<14}{'diversity':>10}{'val recon':>11}{'val KL':>9}{'val ELBO':>11}"
        f"{'IS NLL':>9}{'gap':>7}{'secs':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        kl = "-" if s["val_kl"] is None else f"{s['val_kl']:.2f}"
        gap = "-" if s["elbo_gap_nats"] is None else f"{s['elbo_gap_nats']:.2f}"
        lines.append(
            f"{name:<14}{s['diversity_ratio']:>10.3f}{s['val_recon']:>11.2f}{kl:>9}"
            f"{s['val_elbo_nats']:>11.2f}{s['iw_nll_nats']:>9.2f}{gap:>7}{s['seconds']:>7.1f}"
        )
    lines.append(
        "per-image sums in nats; ELBO with every constant; IS NLL: -log p(x) by importance"
    )
    lines.append(f"sampling (K = {next(iter(summary.values()))['iw_samples']}); gap = IS - ELBO;")
    lines.append("diversity = mean pairwise L2 of 64 prior samples / that of 64 real val images.")
    return "\n".join(lines)
