"""Metrics of a trained model on a split: every number the derivation talks about.

``evaluate(run)`` writes ``RUN/eval/<split>.json``: every metric of ``vaelab.metrics`` in the
pass validation runs (same code, same noise), so the last val row of metrics.jsonl and
eval/val.json agree on every key they share. All values are per image unless said:

- ``loss``, ``elbo_nats``, ``bpd`` and every term the model names (``recon``, ``kl``, ...),
  in eval mode;
- ``iw_nll_nats``: -log p(x) estimated by importance sampling with K samples from q(z|x)
  (Burda et al. 2016): log p(x) ~= logmeanexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)].
  For a model without an encoder the proposal is the prior (K samples of z ~ p(z));
- ``elbo_gap_nats``: (IS log-likelihood) - ELBO, the posterior-approximation error
  KL(q(z|x) || p(z|x)) up to the estimator's own (downward) bias;
- with ``--ais-steps T``: ``ais_nll_nats`` and ``ais_bpd``, -log p(x) by annealed importance
  sampling with HMC from the encoder's q(z|x), or from the prior without an encoder
  (``vaelab.ais``; ``--ais-chains`` chains per image), its ``ais_accept_rate`` and the
  settings (``ais_steps``, ``ais_chains``, ``ais_leapfrog``, ``ais_start``);
- with ``--bdmc N``: ``bdmc_lower_nats`` and ``bdmc_upper_nats``, the mean bounds of log p(x)
  from forward and reverse AIS on N images simulated from the model, and ``bdmc_gap_nats``
  between them, which bounds the error of AIS with those settings (Grosse et al. 2015);
- for a model with a discrete latent (vq_vae, ``continuous_latent`` False) neither importance
  sampling nor AIS runs: ``likelihood_skipped`` says why, and ``vaelab gap`` and ``--bdmc``
  refuse the run;
- ``kl_per_dim`` (for a prior with a closed-form KL per dimension, the standard normal) and
  ``active_units`` (Burda et al. 2016: Cov_x(E_q[z_j]) > 0.01);
- ``mse_per_pixel`` and ``psnr`` (dB, data range 1) of the reconstruction at the posterior mean;
- ``diversity_ratio``: mean pairwise L2 of 64 prior samples over that of 64 real images.

``gap_decomposition(run)`` (``vaelab gap``) writes ``RUN/eval/gap_<split>.json``: the ELBO gap
taken apart (``vaelab.gap``). Importance sampling, AIS, BDMC and q* run the model in the form
``speed.for_sampling`` gives (the same function, faster).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaelab import ais, conditions, data, gap, metrics, rundir, speed
from vaelab import progress as progress_bars
from vaelab.checkpoint import atomic_write, load, run_config, weights_metadata
from vaelab.config import ConfigError, RunConfig
from vaelab.data import ImageDataset
from vaelab.models import MODELS
from vaelab.models.base import GenerativeModel, StepContext
from vaelab.rng import seeded

log = logging.getLogger(__name__)

# Training points of the beta-VAE and FactorVAE classifiers (half as many evaluation points):
# the defaults of vaelab.disentanglement; each point encodes a batch of 64 generated images.
FACTOR_POINTS = 1000
BDMC_STEPS = 100  # AIS steps of `vaelab evaluate --bdmc` without --ais-steps
GAP_AIS_STEPS = 100  # AIS steps of `vaelab gap` by default


def mean_pairwise_distance(images: Tensor) -> float:
    """Mean L2 distance over all pairs i < j of the rows of ``images`` (N, ...)."""
    flat = images.flatten(1).double()
    n = flat.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 images, got {n}")
    d = torch.cdist(flat, flat)
    return (d.sum() / (n * (n - 1))).item()


@torch.no_grad()
def diversity_ratio(
    model: GenerativeModel, dataset: ImageDataset, n: int = 64, seed: int = 0
) -> float:
    """Mean pairwise distance of n prior samples over that of n real images of ``dataset``.

    Near 0: the samples are all the same image (the decoder-only collapse to the average).
    Near 1: the samples are as varied as the data.
    A conditional model samples under conditions drawn from ``dataset``.
    """
    n = min(n, len(dataset))
    device = next(model.parameters()).device
    with seeded(seed), conditions.drawn(model, dataset, n, seed=seed):
        samples = model.sample(n).cpu()
        real = dataset.batch(torch.randperm(len(dataset))[:n].numpy(), device).cpu()
    return mean_pairwise_distance(samples) / mean_pairwise_distance(real)


def ais_start(model: GenerativeModel) -> str:
    """Where the AIS chains of ``model`` start: "q" (its encoder's q(z|x)) or "prior"
    (``ais.start``: no encoder, or a posterior that is not a diagonal Gaussian)."""
    return ais.start(model)


def check_count(value: Any, flag: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` for option ``flag`` (else a ConfigError naming it)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_iw_samples(k: Any) -> int:
    """K for the importance sampler: an integer >= 1 (a ConfigError naming --iw-samples)."""
    return check_count(k, "--iw-samples")


def likelihood_skipped(model: GenerativeModel) -> str | None:
    """Why importance sampling and AIS are not run on ``model`` (recorded in the results as
    ``likelihood_skipped``), or None when they are: a discrete latent has no density in z to
    weigh or to follow (``GenerativeModel.continuous_latent``)."""
    if model.continuous_latent:
        return None
    return (
        f"model '{model.cfg.name}' has a discrete latent: importance sampling and AIS need a "
        "density in z; its elbo_nats is a lower bound on log p(x) under its uniform code prior"
    )


def refuse_discrete(run_dir: Path, what: str) -> None:
    """A ConfigError naming the run when its model's latent is discrete and ``what`` (an
    estimator of log p(x) that needs a density in z) cannot run on it."""
    name = run_config(run_dir).model.name
    if name in MODELS and not MODELS[name].continuous_latent:
        raise ConfigError(
            f"'{run_dir}': {what} needs a continuous latent with a density, and model "
            f"'{name}' has a discrete one; vaelab evaluate reports its ELBO"
        )


def evaluate_model(
    model: GenerativeModel,
    dataset: ImageDataset,
    iw_samples: int = 1000,
    ctx: StepContext | None = None,
    progress: bool = True,
    ais_steps: int = 0,
    ais_chains: int = 16,
    *,
    sampler: GenerativeModel | None = None,
) -> dict[str, Any]:
    """The metrics of ``model`` on ``dataset`` (see the module docstring): every registered
    metric in one pass (``metrics.evaluation_pass``, the pass validation runs), then the
    diversity of samples. ``ctx``: the step context the loss is computed under (the
    checkpoint's; default: no warm-up). ``ais_steps`` > 0 adds AIS with ``ais_chains`` chains.
    ``sampler``: the model in the form importance sampling and AIS run (``speed.for_sampling``;
    default: the model).

    The progress bar (on a terminal) counts importance samples (images x K) and AIS chain
    steps (images x chains x steps), so it shows the rate and the time left even when one batch
    takes minutes; elsewhere one line says what is to be computed.
    """
    check_iw_samples(iw_samples)
    check_count(ais_steps, "--ais-steps", minimum=0)
    check_count(ais_chains, "--ais-chains")
    start = time.perf_counter()
    n = len(dataset)
    skipped = likelihood_skipped(model)
    work = n * (iw_samples + ais_chains * ais_steps) if skipped is None else 0
    if progress and not progress_bars.interactive() and skipped is None:
        extra = f" and AIS with {ais_chains} chains of {ais_steps} steps" if ais_steps else ""
        log.info(f"evaluating {n} images with K = {iw_samples} importance samples each{extra}")
    bar = progress_bars.bar(work, "evaluating", progress, unit="sample", unit_scale=True,
                            leave=False)  # fmt: skip
    try:
        options = metrics.Options(iw_samples, ais_steps, ais_chains)
        result = metrics.evaluation_pass(
            model, dataset, list(metrics.METRICS), ctx, options=options,
            on_samples=bar.update, sampler=sampler,
        )  # fmt: skip
    finally:
        bar.close()
    if skipped is not None:  # neither IS nor AIS ran: say why, instead of their settings
        result["likelihood_skipped"] = skipped
    else:
        result["iw_samples"] = iw_samples
        if ais_steps:
            result.update(ais_steps=ais_steps, ais_chains=ais_chains, ais_leapfrog=ais.LEAPFROG,
                          ais_start=ais_start(model))  # fmt: skip
    result["diversity_ratio"] = diversity_ratio(model, dataset, seed=metrics.SEED)
    result["num_images"] = n
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def simulated_bdmc(
    model: GenerativeModel,
    n: int,
    steps: int,
    chains: int,
    seed: int = metrics.SEED,
    dataset: ImageDataset | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bidirectional Monte Carlo on ``n`` images simulated from the model (z ~ p(z), x ~
    p(x|z)): forward AIS chains from the start ``vaelab evaluate``'s AIS uses (the encoder's
    q(z|x), or the prior) and reverse ones from the z that made each x, an exact posterior
    sample, back to it. Returns x and the lower and upper bounds of log p(x) per image
    (``AISResult.bound``), in batches of metrics.BATCH_SIZE images. A conditional model
    simulates each image under a condition drawn from ``dataset``."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    xs, lower, upper = [], [], []
    try:
        with seeded(seed):
            for start in range(0, n, metrics.BATCH_SIZE):
                b = min(metrics.BATCH_SIZE, n - start)
                with conditions.drawn(model, dataset, b, seed=seed + start):
                    with torch.no_grad():
                        z = model.prior.sample(b, device=device, dtype=dtype)  # z ~ p(z)
                        x = model.likelihood.sample(model.decode_logits(z.unsqueeze(0)))[0]
                        q = model.encode(x) if ais.start(model) == "q" else None
                    lower.append(ais.model_ais(model, x, chains, steps, q=q).bound())
                    upper.append(ais.model_ais(model, x, chains, steps, z0=z, q=q).bound())
                xs.append(x)
    finally:
        model.train(was_training)
    return torch.cat(xs), torch.cat(lower), torch.cat(upper)


def disentanglement_metrics(
    model: GenerativeModel, dataset: ImageDataset, source: str, seed: int = metrics.SEED
) -> dict[str, Any]:
    """MIG on the split's own images; the beta-VAE and FactorVAE scores and DCI on images the
    source draws for chosen factors (vaelab.disentanglement has the definitions)."""
    from vaelab import disentanglement as dis

    if model.conditions:
        raise ConfigError(
            f"model '{model.cfg.name}' is conditional: its code is not asked to carry the "
            "factors, so the disentanglement scores are not defined for it"
        )

    sizes = dataset.factor_sizes
    codes = posterior_means(model, dataset)
    mig = dis.mutual_information_gap(codes, dataset.factors, sizes)
    render, sample = data.GENERATORS[source]

    def represent(factors: np.ndarray) -> np.ndarray:
        images = np.asarray(render(factors))
        return posterior_means(model, ImageDataset(images.reshape(*images.shape[:3], -1)))

    n = FACTOR_POINTS
    train = dis.sample_codes(represent, sample, sizes, 2 * n, rng=seed)  # type: ignore[arg-type]
    test = dis.sample_codes(represent, sample, sizes, n, rng=seed + 1)  # type: ignore[arg-type]
    dci = dis.dci(*train, *test, factor_sizes=sizes)
    scores = {"n_train": n, "n_eval": n // 2, "rng": seed}
    return {
        "mig": mig["mig"],
        "mig_per_factor": {  # None where a factor is constant in the split
            name: None if math.isnan(v) else v
            for name, v in zip(dataset.factor_names, mig["per_factor"], strict=True)
        },
        "beta_vae_score": dis.beta_vae_score(represent, sample, sizes, **scores),  # type: ignore[arg-type]
        "factor_vae_score": dis.factor_vae_score(represent, sample, sizes, **scores),  # type: ignore[arg-type]
        "dci_disentanglement": dci["disentanglement"],
        "dci_completeness": dci["completeness"],
        "dci_informativeness": dci["informativeness"],
    }


@dataclass
class Opened:
    """A run opened for evaluation: its model (eval mode, the precision it was validated in),
    the model in the form the sampling estimators run (``speed.for_sampling``), the step context
    of its checkpoint, its config and the images to evaluate."""

    model: GenerativeModel
    sampler: GenerativeModel
    ctx: StepContext
    cfg: RunConfig
    dataset: ImageDataset


def evaluation_device(train_device: str) -> torch.device:
    """Where a run is evaluated: on the GPU when it trained with train.device cuda or auto and
    one is here, on the CPU otherwise (a run trained on a GPU evaluates on a laptop)."""
    if train_device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def open_run(
    run_dir: Path,
    split: str,
    out: Path,
    images: int | None,
    splits: data.Splits | None,
    progress: bool,
) -> Opened:
    """Check that ``out`` (a file of the run's eval folder) can be written and ``split`` exists,
    then load the run: its model, the first ``images`` images of the split (all: None).

    With the run's train.cpu_memory_cache (the default) on a CPU, the process keeps the memory
    it frees from then on, as training does (``speed.cache_cpu_memory``). The model is loaded on
    ``evaluation_device``."""
    if images is not None:
        check_count(images, "--images")
    if split not in ("val", "test"):
        raise data.DataError(f"split '{split}': expected val or test")
    if run_dir.is_dir():
        rundir.check_writable(out.parent)
        if out.is_dir():
            raise rundir.RunDirError(f"cannot write '{out}': it is a folder")
    cfg = run_config(run_dir)
    model = load(run_dir, device=evaluation_device(cfg.train.device))
    if cfg.train.cpu_memory_cache and next(model.parameters()).device.type == "cpu":
        # as in training: AIS and IS allocate large decoder outputs at every step, and glibc
        # would fault their pages in each time (AIS on the demo's vae: 43 s -> 25 s)
        speed.cache_cpu_memory()
    if cfg.train.precision == "fp64":  # scored in the precision it was trained and validated in
        model = model.double()
    saved = weights_metadata(run_dir)  # the checkpoint's counters, as validation saw them
    step, epoch = (saved.get(k) for k in ("step", "epoch"))
    if splits is None:
        splits = data.build(cfg.data, progress=progress)
    conditions.check_data(cfg.model, splits)  # a cvae: the labels it was trained on
    ctx = StepContext(  # as the trainer builds it, so validation and evaluate agree
        step=step if isinstance(step, int) else 0,
        epoch=epoch if isinstance(epoch, int) else 0,
        kl_warmup_steps=cfg.train.kl_warmup_steps,
        dataset_size=len(splits.train),
    )
    dataset = {"val": splits.val, "test": splits.test}.get(split)
    if dataset is None:
        raise data.DataError(f"split '{split}': this data source has no {split} split")
    if images is not None and images < len(dataset):
        dataset = dataset.subset(np.arange(images))
    sampler = speed.for_sampling(model, cfg.train.channels_last)
    return Opened(model, sampler, ctx, cfg, dataset)


def evaluate(
    run_dir: str | Path,
    split: str = "val",
    iw_samples: int = 1000,
    progress: bool = True,
    splits: data.Splits | None = None,
    *,
    ais_steps: int = 0,
    ais_chains: int = 16,
    images: int | None = None,
    bdmc: int = 0,
) -> dict[str, Any]:
    """Evaluate a run's model on its data's ``split`` (val or test); write RUN/eval/<split>.json.
    ``ais_steps`` > 0 adds AIS (``ais_chains`` chains per image); ``images``: only the first
    that many images of the split (every metric), recorded as num_images. ``bdmc`` > 0 adds the
    BDMC bounds on that many images simulated from the model (``simulated_bdmc``; ais_steps
    steps, or BDMC_STEPS without).

    What cannot work is refused before any work: K below 1, another split, a run whose eval
    folder cannot be written (a read-only run)."""
    run_dir = Path(run_dir)
    check_iw_samples(iw_samples)
    check_count(ais_steps, "--ais-steps", minimum=0)
    check_count(ais_chains, "--ais-chains")
    check_count(bdmc, "--bdmc", minimum=0)
    if bdmc:
        refuse_discrete(run_dir, "--bdmc (AIS on simulated images)")
    out = run_dir / rundir.EVAL / f"{split}.json"
    run = open_run(run_dir, split, out, images, splits, progress)
    model, dataset = run.model, run.dataset
    found = evaluate_model(
        model, dataset, iw_samples, run.ctx, progress, ais_steps, ais_chains, sampler=run.sampler
    )
    result = {"split": split, **found}
    if bdmc:
        start = time.perf_counter()
        steps = ais_steps or BDMC_STEPS
        _, lower, upper = simulated_bdmc(run.sampler, bdmc, steps, ais_chains, dataset=dataset)
        result.update(
            bdmc_images=bdmc,
            bdmc_steps=steps,
            bdmc_chains=ais_chains,
            bdmc_start=ais_start(model),
            bdmc_lower_nats=lower.double().mean().item(),
            bdmc_upper_nats=upper.double().mean().item(),
            bdmc_gap_nats=(upper - lower).double().mean().item(),
            bdmc_seconds=round(time.perf_counter() - start, 3),
        )
    if (  # a conditional model's code is not asked to carry its condition: not measured
        model.has_encoder
        and not model.conditions
        and dataset.factors is not None
        and run.cfg.data.name in data.GENERATORS
    ):
        start = time.perf_counter()
        result.update(disentanglement_metrics(model, dataset, run.cfg.data.name))
        result["disentanglement_seconds"] = round(time.perf_counter() - start, 3)
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    return result


def gap_decomposition(
    run_dir: str | Path,
    split: str = "val",
    images: int | None = None,
    progress: bool = True,
    splits: data.Splits | None = None,
    *,
    ais_steps: int = GAP_AIS_STEPS,
    ais_chains: int = 16,
    iw_samples: int = 1000,
    q_star_steps: int = gap.STEPS,
) -> dict[str, Any]:
    """The ELBO gap of a run taken apart (``vaelab.gap``) on the first ``images`` images of
    ``split``; write RUN/eval/gap_<split>.json: per-image means in nats of log p(x) by AIS, the
    IW bound, ELBO(q*), ELBO(q), the approximation and amortization gaps, each with its standard
    error ("noise"), the same for every batch of 100 images with whether the inequalities hold,
    the settings and the time each estimator took. One evaluation pass (metrics "importance",
    "ais" and "gap"). A model without an encoder gets AIS and the IW bound (prior proposal)."""
    run_dir = Path(run_dir)
    check_iw_samples(iw_samples)
    check_count(ais_steps, "--ais-steps")
    check_count(ais_chains, "--ais-chains")
    check_count(q_star_steps, "--q-star-steps")
    refuse_discrete(run_dir, "vaelab gap (AIS, importance sampling and q*)")
    out = run_dir / rundir.EVAL / f"gap_{split}.json"
    run = open_run(run_dir, split, out, images, splits, progress)
    options = metrics.Options(
        iw_samples, ais_steps, ais_chains, q_star_steps, gap.SAMPLES, gap.LR, gap.ELBO_SAMPLES
    )
    n = len(run.dataset)
    per_image = iw_samples + ais_chains * ais_steps
    if run.model.has_encoder:
        per_image += q_star_steps * gap.SAMPLES + 2 * gap.ELBO_SAMPLES
    if progress and not progress_bars.interactive():
        log.info(f"taking the ELBO gap of {n} images apart (AIS with {ais_chains} chains of "
                 f"{ais_steps} steps, K = {iw_samples}, q* in {q_star_steps} steps)")  # fmt: skip
    bar = progress_bars.bar(n * per_image, "gap", progress, unit="sample", unit_scale=True,
                            leave=False)  # fmt: skip
    collect, seconds = gap.Collector(), {}
    start = time.perf_counter()
    try:
        passed = metrics.evaluation_pass(
            run.model, run.dataset, ["importance", "ais", "gap"], run.ctx, options=options,
            on_samples=bar.update, sampler=run.sampler, on_batch=collect, seconds=seconds,
        )  # fmt: skip
    finally:
        bar.close()
    batches = collect.batches
    result = {
        "split": split,
        "num_images": n,
        **collect.totals.row(),
        "batches_ordered": sum(b["ordered"] for b in batches),
        "batches_ordered_within_noise": sum(b["ordered_within_noise"] for b in batches),
        "num_batches": len(batches),
        "ais_accept_rate": passed["ais_accept_rate"],
        "settings": {
            "ais_steps": ais_steps,
            "ais_chains": ais_chains,
            "ais_leapfrog": ais.LEAPFROG,
            "ais_start": ais_start(run.model),
            "iw_samples": iw_samples,
            "q_star_steps": q_star_steps,
            "q_star_samples": gap.SAMPLES,
            "q_star_lr": gap.LR,
            "elbo_samples": gap.ELBO_SAMPLES,
            "noise_sigmas": gap.NOISE,
            "batch_size": metrics.BATCH_SIZE,
            "seed": metrics.SEED,
        },
        "seconds": {
            "importance": round(seconds["importance"], 3),
            "ais": round(seconds["ais"], 3),
            **({"q_star": round(seconds["gap"], 3)} if run.model.has_encoder else {}),
            "total": round(time.perf_counter() - start, 3),
        },
        "batches": batches,
    }
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def posterior_means(
    model: GenerativeModel, dataset: ImageDataset, batch_size: int = 256
) -> np.ndarray:
    """E_q[z|x] for every image of ``dataset``, (N, d) float32."""
    if not model.has_encoder:
        raise ConfigError(f"model '{model.cfg.name}' has no encoder: there is nothing to encode")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(dataset), batch_size):
        with conditions.given(model, dataset, slice(i, i + batch_size)):
            out.append(model.encode(dataset.batch(slice(i, i + batch_size), device)).mode().cpu())
    return torch.cat(out).numpy().astype(np.float32)


def encode(
    run_dir: str | Path, out: str | Path, dataset: ImageDataset, *, overwrite: bool = False
) -> Path:
    """Write the posterior means of ``dataset`` under a run's model to ``out`` (.npy).

    ``out`` is checked first (``rundir.check_output``): never one of a run's own files, nor an
    existing file vaelab did not write unless ``overwrite``."""
    out = rundir.check_output(out, overwrite=overwrite)
    buf = io.BytesIO()
    np.save(buf, posterior_means(load(run_dir), dataset))
    atomic_write(out, buf.getvalue())
    return out


def gap_table(result: dict[str, Any]) -> str:
    """The numbers of ``gap_decomposition``, one a line with its standard error."""
    noise = result.get("noise", {})
    lines = [f"{'(nats per image)':<20}{'mean':>12}{'std. error':>12}"]
    for key in gap.KEYS:
        if key in result:
            lines.append(f"{key:<20}{result[key]:>12.3f}{noise.get(key, math.nan):>12.3f}")
    order = "yes" if result["ordered"] else "no"
    within = "yes" if result["ordered_within_noise"] else "no"
    lines.append(f"ordered             {order} (within {gap.NOISE:g} std. errors: {within}); "
                 f"batches {result['batches_ordered']} of {result['num_batches']} "
                 f"({result['batches_ordered_within_noise']} within noise)")  # fmt: skip
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    lines.append(f"{result['num_images']} images: {seconds}")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """One metric a line, lists summarised."""
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            shown = ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in value.items())
        elif isinstance(value, list):
            shown = f"[{len(value)} values, max {max(value):.3f}]" if value else "[]"
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = "-" if value is None else str(value)
        lines.append(f"{key:<16}{shown:>24}")
    return "\n".join(lines)
