"""One evaluation pass, shared by validation during training and by ``vaelab evaluate``.

A metric is one function registered by name (``@metric("name")``). The pass runs the model once
per batch, in eval mode, without gradients, and hands each metric a ``Batch``: the images, the
model's output (its terms and its posterior q(z|x), so nothing encodes twice) and the options.
A metric returns named per-image values, (B,) or (B, d); the pass sums them in float64 on the
device and divides by the number of images once, at the end (``finish`` then derives bits per
dimension, the gap and the active units from those means). A name that starts with "_" (an
estimator's variance, say) is not summed: only ``on_batch`` sees it.

The noise of batch b comes from seed + b, whatever ran before it, so validation (metric
"terms") and evaluation (every metric) see the same z for the same image: the last val row of
metrics.jsonl and eval/val.json agree on every key they share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaelab import ais, conditions, distributed
from vaelab.data import ImageDataset
from vaelab.distributed import World
from vaelab.models.base import (
    RESERVED,
    DiagonalGaussian,
    GenerativeModel,
    ModelOutput,
    StepContext,
)
from vaelab.rng import noise_shard, seeded

SEED = 0  # the noise of the evaluation pass: fixed, so epochs and evaluations compare
BATCH_SIZE = 100  # images per batch of the pass (the noise of an image depends on its batch)
ACTIVE_THRESHOLD = 0.01  # an active unit: Cov_x(E_q[z_j]) above this (Burda et al. 2016)
# Decoder outputs held at once by the importance sampler: chunks of K keep memory bounded.
MAX_ELEMENTS = 2**20


@dataclass(frozen=True)
class Options:
    """What the sampling metrics compute, and how much: K importance samples; AIS (0 steps: no
    AIS); the per-image posteriors q* of ``vaelab.gap`` (0 steps: none) and the samples of the
    ELBO estimates that compare q and q*. ``vaelab evaluate`` and ``vaelab gap`` set them."""

    iw_samples: int = 1
    ais_steps: int = 0
    ais_chains: int = 16
    q_star_steps: int = 0
    q_star_samples: int = 16
    q_star_lr: float = 0.01
    elbo_samples: int = 1000


@dataclass
class Batch:
    """What a metric reads: the batch ``x``, the model's ``out`` for it, the model, the pass's
    options and a progress callback, and ``sampler``: the model in the form the sampling
    estimators run (``speed.for_sampling``: the same function, faster), or the model itself."""

    x: Tensor
    out: ModelOutput
    model: GenerativeModel
    options: Options
    on_samples: Callable[[int], object] | None = None
    sampler: GenerativeModel | None = None

    @property
    def fast(self) -> GenerativeModel:
        return self.model if self.sampler is None else self.sampler


Metric = Callable[[Batch], dict[str, Tensor]]
METRICS: dict[str, Metric] = {}
# Metrics that need a density in z (importance weights, AIS, q*): the pass skips them for a
# model with a discrete latent (``GenerativeModel.continuous_latent`` False).
NEEDS_DENSITY: set[str] = set()


def metric(name: str, *, needs_density: bool = False) -> Callable[[Metric], Metric]:
    """Register a metric function under ``name`` (``vaelab evaluate`` runs every one);
    ``needs_density``: it weighs or follows z by its density, so it runs only for models with a
    continuous latent."""

    def wrap(fn: Metric) -> Metric:
        if name in METRICS:
            raise ValueError(f"metric '{name}' is registered twice")
        METRICS[name] = fn
        if needs_density:
            NEEDS_DENSITY.add(name)
        return fn

    return wrap


def is_number(value: Any) -> bool:
    """A value of a metrics row or an eval file that is a number (not a bool, a list or None)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def output_terms(out: ModelOutput, model: GenerativeModel) -> dict[str, Tensor]:
    """The per-image values of a forward pass that a metrics row holds: the loss, the model's
    named terms and its logged scalars (``model.logged``, e.g. a learned variance), the ELBO.
    Training rows and the "terms" metric both read them here."""
    terms = {**out.terms, **model.logged(out.loss.shape[0])}
    clash = RESERVED.intersection(terms)
    if clash:
        raise ValueError(
            f"model term '{sorted(clash)[0]}' is reserved (a key of every metrics row: "
            f"{', '.join(sorted(RESERVED))}); give the term another name"
        )
    return {"loss": out.loss, **terms, "elbo_nats": out.elbo}


@metric("terms")
def terms(b: Batch) -> dict[str, Tensor]:
    """The training terms in eval mode: loss, every named term, the ELBO."""
    return output_terms(b.out, b.model)


@torch.no_grad()
def importance_estimate(
    model: GenerativeModel,
    x: Tensor,
    k: int,
    on_chunk: Callable[[int], object] | None = None,
    q: DiagonalGaussian | None = None,
) -> tuple[Tensor, Tensor]:
    """log p(x) estimated with k importance samples, (B,), and the estimate's variance by the
    delta method (``ais.log_mean_exp_variance``), in chunks of bounded memory (the posterior
    ``q`` of x if already computed); ``on_chunk(n)`` after each chunk, with n its images x
    samples (for a progress bar)."""
    chunk = max(1, min(k, MAX_ELEMENTS // (x.shape[0] * model.num_dims)))
    sums, squares = [], []
    for start in range(0, k, chunk):
        size = min(chunk, k - start)
        log_w = model.log_weights(x, size, q).double()
        sums.append(torch.logsumexp(log_w, dim=0))
        squares.append(torch.logsumexp(2 * log_w, dim=0))
        if on_chunk is not None:
            on_chunk(size * x.shape[0])
    lse, lse_sq = torch.logsumexp(torch.stack(sums), 0), torch.logsumexp(torch.stack(squares), 0)
    return lse - math.log(k), ais.log_mean_exp_variance(lse, lse_sq, k)


@metric("importance", needs_density=True)
def importance(b: Batch) -> dict[str, Tensor]:
    """log p(x) by importance sampling with K = iw_samples draws from q(z|x) (from the prior
    without an encoder; Burda et al. 2016)."""
    opt = b.options
    log_px, var = importance_estimate(b.fast, b.x, opt.iw_samples, b.on_samples, b.out.posterior)
    return {"log_px": log_px, "_log_px_var": var}


@metric("ais", needs_density=True)
def annealed(b: Batch) -> dict[str, Tensor]:
    """log p(x) by annealed importance sampling with HMC transitions (``vaelab.ais``), from the
    encoder's q(z|x) (from the prior without an encoder, or when q is not a diagonal Gaussian:
    ``ais.start``): ais_chains chains of ais_steps steps per image, all in one tensor. Only when
    asked for (ais_steps > 0)."""
    opt = b.options
    if opt.ais_steps < 1:
        return {}
    n, chains = b.x.shape[0], opt.ais_chains
    on_step = None if b.on_samples is None else lambda _: b.on_samples(n * chains)  # type: ignore[misc]
    q = b.out.posterior if ais.start(b.fast) == "q" else None
    result = ais.model_ais(b.fast, b.x, chains, opt.ais_steps, on_step=on_step, q=q)
    return {
        "ais_log_px": result.log_px(),
        "ais_accept_rate": b.x.new_full((n,), result.accept_rate),
        "_ais_log_px_var": result.variance(),
    }


@metric("posterior")
def posterior(b: Batch) -> dict[str, Tensor]:
    """KL per latent dimension (where the prior has it in closed form and q is a diagonal
    Gaussian: not for a VampPrior, whose KL is one Monte Carlo estimate, nor for iaf_vae's flow),
    and the posterior means' first two moments (active units; for a flow, its base Gaussian's
    means ``q.mu``)."""
    q = b.out.posterior
    if q is None:
        return {}
    diagonal = isinstance(q, DiagonalGaussian)
    kl_dims = b.model.prior.analytic_kl_per_dim(q) if diagonal else None
    per_dim = {} if kl_dims is None else {"kl_per_dim": kl_dims}
    return {**per_dim, "mu": q.mu, "mu_squared": q.mu.square()}


@metric("reconstruction")
def reconstruction(b: Batch) -> dict[str, Tensor]:
    """Mean squared error per pixel and PSNR (dB, data range 1) of the decoder's mean at the
    posterior mean."""
    q = b.out.posterior
    if q is None:
        return {}
    mse = (b.model.decode(q.mode()) - b.x).square().flatten(1).mean(1)
    return {"mse_per_pixel": mse, "psnr": -10.0 * torch.log10(mse.clamp_min(1e-10))}


class Sums:
    """Float64 sums of named per-image values, kept on the device (no synchronisation until
    ``means``). The (B,) values of a batch are summed in one stacked tensor: a few kernels per
    training step, whatever the number of terms."""

    def __init__(self) -> None:
        self.n = 0
        self.values: dict[str, Tensor] = {}
        self.vector: tuple[str, ...] = ()  # the names of the (B,) values, in ``self.packed``
        self.packed: Tensor | None = None

    def add(self, values: dict[str, Tensor], n: int) -> None:
        """Add the per-image values of ``n`` images."""
        names = tuple(k for k, t in values.items() if t.dim() == 1)
        if names:
            if self.packed is not None and names != self.vector:
                raise ValueError(f"terms changed between batches: {self.vector} -> {names}")
            batch = torch.stack([values[k].detach() for k in names]).double().sum(1)
            self.packed = batch if self.packed is None else self.packed + batch
            self.vector = names
        for name, t in values.items():
            if t.dim() != 1:
                s = t.detach().double().sum(0)
                self.values[name] = self.values[name] + s if name in self.values else s
        self.n += n

    def total(self, name: str) -> Tensor:
        """The running sum of one (B,) value (a device tensor; no synchronisation)."""
        assert self.packed is not None
        return self.packed[self.vector.index(name)].clone()

    def means(self, world: World | None = None) -> dict[str, Any]:
        """Per-image means over all processes, in the order the values were named: floats, or
        lists for (B, d) values. One synchronisation."""
        parts = {} if self.packed is None else dict(zip(self.vector, self.packed, strict=True))
        parts.update(self.values)
        flat = [t.reshape(-1) for t in parts.values()]
        device = flat[0].device if flat else "cpu"
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=device)
        packed = distributed.all_sum(torch.cat([*flat, n]), world or World()).cpu()
        count, out, i = packed[-1].item(), {}, 0
        for name, t in parts.items():
            part = packed[i : i + t.numel()] / count
            out[name] = part.item() if t.dim() == 0 else part.tolist()
            i += t.numel()
        return out


def finish(means: dict[str, Any], model: GenerativeModel) -> dict[str, Any]:
    """The numbers a row or an evaluation reports, from the pass's means: bits per dimension
    next to each log-likelihood, the gap, the active units."""
    out = dict(means)
    if "elbo_nats" in out:
        i = list(out).index("elbo_nats") + 1
        items = list(out.items())
        items.insert(i, ("bpd", model.bits_per_dim(out["elbo_nats"])))
        out = dict(items)
    if "log_px" in out:
        log_px = out.pop("log_px")
        out["iw_nll_nats"] = -log_px
        out["iw_bpd"] = model.bits_per_dim(log_px)
        if model.has_encoder and "elbo_nats" in out:
            out["elbo_gap_nats"] = log_px - out["elbo_nats"]
    if "ais_log_px" in out:
        log_px = out.pop("ais_log_px")
        out["ais_nll_nats"] = -log_px
        out["ais_bpd"] = model.bits_per_dim(log_px)
        out["ais_accept_rate"] = out.pop("ais_accept_rate")
    if "mu" in out:
        mean, second = np.array(out.pop("mu")), np.array(out.pop("mu_squared"))
        out["active_units"] = int((second - mean**2 > ACTIVE_THRESHOLD).sum())
    return out


@torch.no_grad()
def evaluation_pass(
    model: GenerativeModel,
    dataset: ImageDataset,
    names: Sequence[str] = ("terms",),
    ctx: StepContext | None = None,
    *,
    options: Options | None = None,
    on_samples: Callable[[int], object] | None = None,
    world: World | None = None,
    sampler: GenerativeModel | None = None,
    on_batch: Callable[[dict[str, Tensor]], object] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run the metrics ``names`` over ``dataset`` in batches of BATCH_SIZE; return their
    per-image means, finished (``finish``). ``options``: what the sampling metrics compute;
    ``sampler``: the model in the form they run (``speed.for_sampling``; default the model
    itself); ``on_samples(n)``: progress, in importance samples, AIS chain steps and q*
    samples; ``on_batch(values)``: each batch's per-image values, "_" names included;
    ``seconds``: filled with the time each metric took, summed over batches.

    Eval mode, no gradients, the model's own dtype (fp64 for a train.precision=fp64 run). Under
    torchrun each process computes rows rank::world of every batch, with the noise that batch
    has in one process, and the sums are added over processes.
    """
    world = world or World()
    options = options or Options()
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} (known: {', '.join(METRICS)})")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    sums = Sums()
    try:
        with seeded(SEED):
            for b, i in enumerate(range(0, len(dataset), BATCH_SIZE)):
                torch.manual_seed(SEED + b)
                n = min(BATCH_SIZE, len(dataset) - i)
                rows = np.arange(i + world.rank, i + n, world.size) if world.distributed else None
                x = dataset.batch(slice(i, i + n) if rows is None else rows, param.device)
                x = x.to(param.dtype)
                given = conditions.given(
                    model, dataset, slice(i, i + n) if rows is None else rows, sampler
                )
                with noise_shard(world.rank, world.size, n), given:
                    out = model(x, ctx)
                    batch = Batch(x, out, model, options, on_samples, sampler)
                    values: dict[str, Tensor] = {}
                    for name in names:
                        if name in NEEDS_DENSITY and not model.continuous_latent:
                            continue  # evaluate records why (likelihood_skipped)
                        start = time.perf_counter()
                        found = METRICS[name](batch)
                        if seconds is not None:
                            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                        clash = values.keys() & found.keys()
                        if clash:
                            raise ValueError(
                                f"metric '{name}' returns '{sorted(clash)[0]}', which a term or "
                                "another metric already returns: rename the term or the metric"
                            )
                        values.update(found)
                    if on_batch is not None:
                        on_batch(values)
                    reported = {k: v for k, v in values.items() if not k.startswith("_")}
                    sums.add(reported, x.shape[0])
    finally:
        model.train(was_training)
    return finish(sums.means(world), model)
