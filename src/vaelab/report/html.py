"""The HTML report: runs side by side on one self-contained page.

Every image is embedded as a PNG data URI and the style sheet is inline, so the file opens from
disk with no network and can be mailed or archived as one file. The report reads run
directories only (config.yaml, metrics.jsonl, eval/val.json, the model): it never trains or
evaluates.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from vaelab import conditions, data, gap, rundir, samplers
from vaelab.checkpoint import CheckpointError, atomic_write, load, read_metrics, run_config
from vaelab.metrics import is_number
from vaelab.models.base import RESERVED
from vaelab.report import pictures
from vaelab.report.figures import curves_png, gap_png, grid_png, rate_distortion_png

SWEEP_FILE = rundir.SWEEP

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.runs { display: grid; gap: 1em; grid-template-columns: repeat(var(--n), minmax(0, 1fr)); }
.runs figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; image-rendering: pixelated; }
.runs.curves { grid-template-columns: minmax(0, 1100px); }
.curves img { image-rendering: auto; }
.note { color: #555; font-size: 0.9em; }
"""

# Evaluation keys shown in the table, in order, with how to read them.
EVAL_KEYS = [
    ("elbo_nats", "ELBO (nats/image, higher is better)"),
    ("loss", "training loss (eval mode, nats/image)"),
    ("iw_nll_nats", "IS negative log-likelihood (nats/image)"),
    ("elbo_gap_nats", "gap: IS log-likelihood - ELBO (nats)"),
    ("bpd", "bits/dim from the ELBO"),
    ("iw_bpd", "bits/dim from the IS estimate"),
    ("recon", "reconstruction term (nats)"),
    ("kl", "KL(q(z|x) || p(z)) (nats)"),
    ("active_units", "active units (Cov_x E_q[z_j] > 0.01)"),
    ("mse_per_pixel", "MSE per pixel (posterior mean)"),
    ("psnr", "PSNR (dB)"),
    ("diversity_ratio", "diversity of 64 samples / of 64 real images"),
    ("mig", "MIG (Chen et al. 2018)"),
    ("beta_vae_score", "beta-VAE score (Higgins et al. 2017)"),
    ("factor_vae_score", "FactorVAE score (Kim & Mnih 2018)"),
    ("dci_disentanglement", "DCI disentanglement (Eastwood & Williams 2018)"),
    ("dci_completeness", "DCI completeness"),
    ("dci_informativeness", "DCI informativeness"),
    ("iw_samples", "importance samples K"),
    ("num_images", "images evaluated"),
]


def _other_terms(evals: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The terms a model adds (sigma2, tc, ...): numbers in eval/val.json that EVAL_KEYS does not
    name, each shown under its own name."""
    known = {key for key, _ in EVAL_KEYS} | RESERVED | {"disentanglement_seconds"}
    out: list[tuple[str, str]] = []
    for e in evals:
        for key, value in e.items():
            if key not in known and is_number(value):
                out.append((key, f"{key} (a term of the model)"))
                known.add(key)
    return out


def _img(png: bytes, alt: str) -> str:
    data_uri = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data_uri}">'


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _config_table(names: list[str], configs: list[dict[str, Any]]) -> tuple[str, str]:
    flat = [_flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    if len(configs) > 1:
        keys = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
        title = "Configs that differ"
    else:
        title = "Config"
    if not keys:
        return title, '<p class="note">The runs have the same config.</p>'
    rows = [[k, *(_fmt(f.get(k)) for f in flat)] for k in keys]
    return title, _table(["key", *names], rows)


def _section(title: str, cells: list[str], css: str = "") -> str:
    inner = "".join(f"<figure>{c}</figure>" for c in cells)
    grid = f'<div class="runs {css}" style="--n:{len(cells)}">{inner}</div>'
    return f"<h2>{html.escape(title)}</h2>{grid}"


def _read_eval(path: Path) -> dict[str, Any]:
    """A run's eval/val.json ({} if it has none)."""
    if not path.is_file():
        return {}
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"'{path}': not readable JSON ({err})") from None
    if not isinstance(result, dict):
        raise CheckpointError(f"'{path}': expected a mapping of metrics")
    return result


def _gap_section(names: list[str], gaps: list[dict[str, Any]]) -> str:
    """The ELBO gap taken apart (``vaelab gap``) for the runs that have eval/gap_val.json: a
    table with each number's standard error, and the stacked bars of the runs with an encoder
    ("" when no run has one)."""
    have = [(name, g) for name, g in zip(names, gaps, strict=True) if g]
    if not have:
        return ""
    rows = []
    for key in gap.KEYS:
        cells = [
            "-" if key not in g else f"{_fmt(g[key])} ± {_fmt(g['noise'][key])}" for _, g in have
        ]
        rows.append([key, *cells])
    for key, label in (("num_images", "images"), ("ordered", "ordered (every batch)")):
        rows.append([label, *(html.escape(str(g.get(key))) for _, g in have)])
    times = [", ".join(f"{k} {v:.0f} s" for k, v in g.get("seconds", {}).items()) for _, g in have]
    rows.append(["seconds", *(html.escape(t) for t in times)])
    settings = have[0][1].get("settings", {})
    note = html.escape(", ".join(f"{k} {v}" for k, v in settings.items()))
    table = _table(["ELBO gap (val, nats per image, ± std. error)", *(n for n, _ in have)], rows)
    with_q = [(name, g) for name, g in have if "elbo_q" in g]
    figure = _img(gap_png(with_q), "the ELBO gap taken apart") if with_q else ""
    return (
        f"<h2>The ELBO gap taken apart (vaelab gap)</h2>{table}"
        f'<p class="note">log p(x) (AIS) &ge; ELBO(q*) &ge; ELBO(q): approximation gap = '
        f"log p(x) - ELBO(q*), amortization gap = ELBO(q*) - ELBO(q). Settings: {note}.</p>"
        f"{figure}"
    )


def _quality_section(names: list[str], qualities: list[dict[str, Any]]) -> str:
    """Sample quality (``vaelab quality``) for the runs that have eval/quality_val.json: FID and
    KID in the classifier's feature space per sampler, and the floor of real training images
    ("" when no run has one)."""
    have = [(name, q) for name, q in zip(names, qualities, strict=True) if q]
    if not have:
        return ""
    kinds = [("prior", "prior samples"), ("gmm", "GMM sampler samples")]
    metrics = [("fid_classifier", "FID (classifier)"), ("kid_classifier", "KID (classifier)")]
    inception = any("fid_inception" in q["train_vs_held_out"] for _, q in have)
    if inception:  # vaelab quality --inception-weights
        metrics += [("fid_inception", "FID (Inception)"), ("kid_inception", "KID (Inception)")]

    def cell(d: dict[str, Any], metric: str) -> str:
        return _fmt(d[metric]) if metric in d else "-"

    rows = []
    for metric, label in metrics:
        for kind, what in kinds:
            cells = [cell(q["samplers"][kind], metric) if kind in q["samplers"] else "-"
                     for _, q in have]  # fmt: skip
            rows.append([f"{label}, {what}", *cells])
        rows.append([f"{label}, training images (floor)",
                     *(cell(q["train_vs_held_out"], metric) for _, q in have)])  # fmt: skip
    rows.append(["images", *(html.escape(str(q.get("num_images"))) for _, q in have)])
    if inception:
        shas = [q.get("inception_weights", {}).get("sha256", "-")[:12] for _, q in have]
        rows.append(["Inception weights (sha256)", *(html.escape(s) for s in shas)])
    space = html.escape(str(have[0][1].get("feature_space", "")))
    table = _table(["sample quality (val, lower is better)", *(n for n, _ in have)], rows)
    note = (
        " The Inception rows are in the 2048 pool features of FID's Inception-v3 (the weights "
        "file's sha256 is shown): the standard FID only with pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth (sha256 6726825d...)."
        if inception
        else ""
    )
    return (
        f"<h2>Sample quality (vaelab quality)</h2>{table}"
        f'<p class="note">Fr&eacute;chet and kernel distances between samples and as many val '
        f"images in the feature space of a small classifier trained on the data's labels "
        f"({space}): they rank models on this data set and are not Inception FIDs.{note}</p>"
    )


def _samples(run: Path, model: Any, val: Any, label: str) -> tuple[Any, int, str]:
    """64 samples, 8 a row, and their caption: from the prior; for a discrete latent
    (vq_vae) through its fitted code prior when one was saved for these weights (the report
    never fits one), else the uniform prior over codes; a conditional model's under labels
    drawn from ``val``."""
    sampler = samplers.saved_code_sampler(run, model)
    if sampler is not None:
        what = "samples through the fitted code prior"
    elif not model.continuous_latent:
        what = "samples, codes uniform (no fitted code prior saved: `vaelab sample` fits one)"
    else:
        what = "prior samples" + (", labels of val images" if model.conditions else "")
    return pictures.samples(model, 64, 1.0, 0, sampler, val), 8, f"{label}: 64 {what}"


def write_report(
    runs: list[str | Path],
    out: str | Path,
    title: str = "vaelab report",
    extra_html: str = "",
    *,
    overwrite: bool = False,
) -> Path:
    """Write one self-contained HTML page comparing ``runs``; return its path.

    ``out`` is checked first (``rundir.check_output``): never one of a run's own files, nor an
    existing file vaelab did not write unless ``overwrite``."""
    out = rundir.check_output(out, overwrite=overwrite)
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("write_report needs at least one run directory")
    names = [r.name or str(r) for r in runs]
    configs, evals, gaps, qualities = [], [], [], []
    curves, recons, samples, interps, traversals = [], [], [], [], []
    data_cache: dict[str, data.Splits] = {}
    for run, name in zip(runs, names, strict=True):
        cfg = run_config(run)
        configs.append(cfg.to_dict())
        evals.append(_read_eval(run / rundir.EVAL / "val.json"))
        gaps.append(_read_eval(run / rundir.EVAL / "gap_val.json"))
        qualities.append(_read_eval(run / rundir.EVAL / "quality_val.json"))
        key = json.dumps(configs[-1]["data"], sort_keys=True)
        if key not in data_cache:
            data_cache[key] = data.build(cfg.data, progress=False)
        conditions.check_data(cfg.model, data_cache[key])  # a cvae: the labels it was trained on
        val = data_cache[key].val
        model = load(run)
        label = f"{name} ({cfg.model.name})"
        curves.append(_img(curves_png(read_metrics(run), title=label), f"{name} curves"))
        grid, caption = pictures.reconstructions(model, val)
        recons.append(_img(grid_png(grid, 8, f"{label}: {caption}", group=2), f"{name} recon"))
        samples.append(_img(grid_png(*_samples(run, model, val, label)), name))
        interps.append(
            _img(grid_png(pictures.interpolations(model, val), 10, f"{label}"), f"{name} interp")
        )
        dims = pictures.active_dimensions(model, val, 8)
        travel = pictures.traversal(model, val, dims)
        caption = f"{label}: rows = dims {dims}, values -3..3"
        traversals.append(_img(grid_png(travel, 9, caption), f"{name} traversal"))

    config_title, config_html = _config_table(names, configs)
    if any(evals):
        keys = EVAL_KEYS + _other_terms(evals)
        rows = [[label, *(_fmt(e.get(key)) for e in evals)] for key, label in keys]
        if any("likelihood_skipped" in e for e in evals):  # a discrete latent (vq_vae)
            why = [_fmt(e.get("likelihood_skipped")) for e in evals]
            rows.append(["importance sampling and AIS not run, because", *why])
        eval_html = _table(["metric (val, per image)", *names], rows)
    else:
        eval_html = '<p class="note">No run has been evaluated (vaelab evaluate RUN).</p>'
    body = [
        f"<h1>{html.escape(title)}</h1>",
        '<p class="note">Every number is a per-image sum (over pixels, over latent dimensions) '
        "in nats unless said; the ELBO includes all constants; beta multiplies the KL "
        "(Higgins et al. 2017).</p>",
        f"<h2>{config_title}</h2>{config_html}",
        f"<h2>Evaluation</h2>{eval_html}",
        _quality_section(names, qualities),
        _gap_section(names, gaps),
        extra_html,
        _section("Loss curves (train and val)", curves, "curves"),
        _section("Reconstructions", recons),
        _section("Samples from the prior", samples),
        _section("Interpolations between pairs of val images (latent space)", interps),
        _section("Latent traversals (the most active dimensions)", traversals),
    ]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"{rundir.HTML_MARK}<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    atomic_write(out, page)
    return out


def is_sweep(folder: str | Path) -> bool:
    return (Path(folder) / SWEEP_FILE).is_file()


def _safe_name(name: Any) -> bool:
    """A single folder name: no separators, not '.' or '..', not absolute, not empty."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and Path(name).name == name
    )


def sweep_runs(sweep_dir: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """A sweep folder's description (sweep.json, written by `vaelab sweep`) and its runs.

    The description is checked: its runs must be single folder names inside the sweep folder
    (a tampered '../x' or '/etc' is refused), its axes and values mappings."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"'{path}': not a readable sweep description ({err})") from None
    if not isinstance(info, dict) or not isinstance(info.get("runs"), list):
        raise CheckpointError(f"'{path}': expected a mapping with a list of 'runs'")
    for name in info["runs"]:
        if not _safe_name(name):
            raise CheckpointError(
                f"'{path}': run {str(name)[:80]!r} is not a folder name inside the sweep "
                "folder (expected a name such as 'model.beta=4', without '/' or '..')"
            )
    if not isinstance(info.get("axes", {}), dict):
        raise CheckpointError(f"'{path}': 'axes' expected a mapping of swept keys to values")
    values = info.get("values", {})
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise CheckpointError(f"'{path}': 'values' expected a mapping of run name to values")
    return info, [Path(sweep_dir) / name for name in info["runs"]]


def write_sweep_report(sweep_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """The report of a sweep's runs, with a rate-distortion figure of their last val epoch.

    ``out`` is checked first, as for ``write_report``."""
    out = rundir.check_output(out, overwrite=overwrite)
    info, runs = sweep_runs(sweep_dir)
    axes = list(info.get("axes", {}))
    points = []
    runs = [run for run in runs if (Path(run) / rundir.WEIGHTS).is_file()]
    if not runs:
        raise CheckpointError(f"'{sweep_dir}': no run of the sweep has finished an epoch yet")
    for run in runs:
        val = [r for r in read_metrics(run) if r["split"] == "val"]
        if not val or not all(is_number(val[-1].get(k)) for k in ("kl", "elbo_nats")):
            continue  # a model without a KL term
        swept = info.get("values", {}).get(run.name, {})
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in swept.items()) or run.name
        # Distortion with every constant (-ELBO - KL), so distortion + rate is -ELBO exactly
        # even when runs differ in their likelihood or decoder variance.
        points.append((label, -val[-1]["elbo_nats"] - val[-1]["kl"], val[-1]["kl"]))
    extra = ""
    if points:
        title = f"rate-distortion over {', '.join(axes)}"
        png = rate_distortion_png(points, title)
        extra = f"<h2>Rate and distortion</h2>{_img(png, 'rate-distortion')}" + (
            '<p class="note">Each point is a run (last epoch, val). Dashed: iso-ELBO lines, '
            "distortion + rate = -ELBO. beta multiplies the KL (Higgins et al. 2017).</p>"
        )
    title = f"vaelab sweep: {', '.join(f'{k} in {v}' for k, v in info.get('axes', {}).items())}"
    return write_report(runs, out, title=title, extra_html=extra, overwrite=overwrite)
