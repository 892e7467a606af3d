"""The ELBO gap taken apart (Cremer et al. 2018, "Inference suboptimality in variational
autoencoders").

For each image, ``optimise_posterior`` fits its own diagonal Gaussian q*(z|x), starting at the
encoder's q(z|x), by Adam on the ELBO. Then

    log p(x) >= ELBO(q*) >= ELBO(q)    and    log p(x) >= IW bound >= ELBO(q),

so the gap log p(x) - ELBO(q) splits into the approximation gap log p(x) - ELBO(q*) (what no
diagonal Gaussian can close) and the amortization gap ELBO(q*) - ELBO(q) (what one encoder for
all images costs). log p(x) comes from AIS (``vaelab.ais``), the IW bound from importance
sampling with q (``metrics.importance``).

The ELBOs use the model's prior (``model.prior``): the closed-form KL where it has one (the
standard normal), else the Monte Carlo form E_q[log p(x|z) + log p(z) - log q(z|x)] on the same
draws of z (a VampPrior), so every number here is the learned model's.

The metric "gap" (registered here, run by ``vaelab gap``, see ``evaluate.gap``) returns
ELBO(q) and ELBO(q*) per image; ``batch_row`` and ``summary`` turn the evaluation pass's values
into the numbers of ``eval/gap_<split>.json``, each with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vaelab import metrics
from vaelab.metrics import Batch
from vaelab.models import priors
from vaelab.models.base import DiagonalGaussian, GenerativeModel
from vaelab.rng import batch_randn

STEPS = 200  # Adam steps of q* per batch of images (500 steps: 0.004 nats more on the demo's vae)
SAMPLES = 16  # z samples per image for each step's ELBO estimate
LR = 0.01
ELBO_SAMPLES = 1000  # z samples per image for the final ELBO(q) and ELBO(q*)
NOISE = 3.0  # an inequality a >= b holds "within noise" when a - b >= -NOISE standard errors

# The quantities of eval/gap_<split>.json, per-image means in nats, and the inequalities between
# them that hold in expectation: (larger, smaller).
KEYS = ("log_px_ais", "iw_bound", "elbo_q_star", "elbo_q", "approximation_gap", "amortization_gap")
ORDER = (
    ("log_px_ais", "elbo_q_star"),
    ("elbo_q_star", "elbo_q"),
    ("log_px_ais", "iw_bound"),
    ("iw_bound", "elbo_q"),
)


def elbo(
    model: GenerativeModel,
    x: Tensor,
    q: DiagonalGaussian,
    samples: int,
    prior: priors.Prior | None = None,
) -> Tensor:
    """ELBO(q) per image, (B,): E_q[log p(x|z)] by ``samples`` reparameterised draws, minus
    KL(q || p(z)), closed form where the prior (default: the model's) has one, else by Monte
    Carlo on the same draws."""
    prior = model.prior if prior is None else prior
    if not isinstance(q, DiagonalGaussian):  # a flow (iaf_vae): log q of its own samples
        z, log_q = q.rsample_with_log_prob(samples)
        log_lik = -model.likelihood.nll(x, model.decode_logits(z))
        return (log_lik + prior.log_prob(z) - log_q).mean(0)
    z = q.rsample(samples)  # (samples, B, d)
    log_lik = -model.likelihood.nll(x, model.decode_logits(z))  # (samples, B)
    return log_lik.mean(0) - prior.kl(q, z)


def optimise_posterior(
    model: GenerativeModel,
    x: Tensor,
    q: DiagonalGaussian,
    steps: int = STEPS,
    samples: int = SAMPLES,
    lr: float = LR,
) -> DiagonalGaussian:
    """q*(z|x): a diagonal Gaussian per image, from ``q`` (the encoder's), after ``steps`` of
    Adam on the summed ELBO estimate (each image's parameters only see its own term), the step
    size falling linearly from ``lr`` to 0. The model's parameters are not changed.

    A posterior that is not a diagonal Gaussian (iaf_vae's flow) keeps its flow and context as
    they are: q* is the same flow from a base Gaussian N(mu, diag exp(logvar)) of the image's
    own (``q.with_base``), so the approximation gap is what no such flow closes."""
    prior = model.prior.fixed()  # encoded once (a VampPrior), not at every step
    make = DiagonalGaussian if isinstance(q, DiagonalGaussian) else q.with_base
    mu = q.mu.detach().clone().requires_grad_(True)
    logvar = q.logvar.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, logvar], lr=lr)
    with torch.enable_grad():
        for i in range(steps):
            # the step size falls linearly to 0: the last steps average out the sampling noise
            opt.param_groups[0]["lr"] = lr * (1.0 - i / steps)
            loss = -elbo(model, x, make(mu, logvar), samples, prior).sum()
            # gradients of q's parameters only: the model's .grad stay as they are
            mu.grad, logvar.grad = torch.autograd.grad(loss, [mu, logvar])
            opt.step()
    return make(mu.detach(), logvar.detach())


@dataclass
class ElboComparison:
    """ELBO(q) and ELBO(q*) per image, (B,), the variances of the two estimates and of their
    difference (from the same draws)."""

    elbo_q: Tensor
    elbo_q_star: Tensor
    elbo_q_var: Tensor
    elbo_q_star_var: Tensor
    difference_var: Tensor


@torch.no_grad()
def compare_elbos(
    model: GenerativeModel,
    x: Tensor,
    q: DiagonalGaussian,
    q_star: DiagonalGaussian,
    samples: int,
    on_samples: Callable[[int], object] | None = None,
) -> ElboComparison:
    """ELBO(q) and ELBO(q*) with ``samples`` draws each, z = mu + sigma * eps with the same eps
    for both (common random numbers: the difference ELBO(q*) - ELBO(q) keeps little of either's
    noise), in chunks of bounded memory, sums in float64. The KLs are exact where the prior has a
    closed form; else each draw's term is log p(x|z) + log p(z) - log q(z|x). The variances are
    those of the Monte Carlo means (sample variance / samples). A flow posterior (iaf_vae)
    pushes the same base noise eps through its flow (``transform``), with log q of its
    samples."""
    prior = model.prior.fixed()
    # None: Monte Carlo (always for a flow, whose KL has no closed form)
    kls = [prior.analytic_kl(p) if isinstance(p, DiagonalGaussian) else None for p in (q, q_star)]
    b, d = q.mu.shape
    chunk = max(1, min(samples, metrics.MAX_ELEMENTS // (b * model.num_dims)))
    total = torch.zeros(3, b, dtype=torch.float64, device=x.device)  # q, q*, q* - q
    squares = torch.zeros_like(total)
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        eps = batch_randn((size, b, d), 1, device=x.device, dtype=q.mu.dtype)
        ll = [_log_weight(model, prior, x, p, eps, kl is None).double()
              for p, kl in zip((q, q_star), kls, strict=True)]  # fmt: skip
        terms = torch.stack([ll[0], ll[1], ll[1] - ll[0]])  # (3, size, B)
        total += terms.sum(1)
        squares += terms.square().sum(1)
        if on_samples is not None:
            on_samples(2 * size * b)
    mean = total / samples
    var = (squares / samples - mean.square()).clamp_min(0) / max(samples - 1, 1)
    kl_q, kl_star = (0.0 if kl is None else kl.double() for kl in kls)
    return ElboComparison(
        elbo_q=mean[0] - kl_q,
        elbo_q_star=mean[1] - kl_star,
        elbo_q_var=var[0],
        elbo_q_star_var=var[1],
        difference_var=var[2],
    )


def _log_weight(
    model: GenerativeModel,
    prior: priors.Prior,
    x: Tensor,
    q: DiagonalGaussian,
    eps: Tensor,
    with_prior: bool,
) -> Tensor:
    """log p(x|z) for the draws z (n, B, d) of q at base noise eps, plus log p(z) - log q(z|x)
    when ``with_prior`` (a prior without a closed-form KL, or a flow), (n, B)."""
    if isinstance(q, DiagonalGaussian):
        z = q.mu + q.std * eps
        log_q = q.log_prob(z) if with_prior else None
    else:
        z, log_q = q.transform(eps)
    log_lik = -model.likelihood.nll(x, model.decode_logits(z))
    return log_lik + prior.log_prob(z) - log_q if with_prior else log_lik


@metrics.metric("gap", needs_density=True)
def decomposition(b: Batch) -> dict[str, Tensor]:
    """ELBO(q) and ELBO(q*) per image: q* optimised from the encoder's q for q_star_steps Adam
    steps (``optimise_posterior``), both ELBOs from the same elbo_samples draws
    (``compare_elbos``). Only when asked for (q_star_steps > 0), for a model with an encoder."""
    opt, q = b.options, b.out.posterior
    if opt.q_star_steps < 1 or q is None:
        return {}
    q_star = optimise_posterior(b.fast, b.x, q, opt.q_star_steps, opt.q_star_samples, opt.q_star_lr)
    if b.on_samples is not None:
        b.on_samples(b.x.shape[0] * opt.q_star_steps * opt.q_star_samples)
    est = compare_elbos(b.fast, b.x, q, q_star, opt.elbo_samples, b.on_samples)
    return {
        "elbo_q": est.elbo_q,
        "elbo_q_star": est.elbo_q_star,
        "_elbo_q_var": est.elbo_q_var,
        "_elbo_q_star_var": est.elbo_q_star_var,
        "_amortization_gap_var": est.difference_var,
    }


def _per_image(values: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The per-image quantities of KEYS present in a batch's values, and their variances."""
    v = {k: t.double() for k, t in values.items()}
    est, var = {}, {}
    if "ais_log_px" in v:
        est["log_px_ais"], var["log_px_ais"] = v["ais_log_px"], v["_ais_log_px_var"]
    if "log_px" in v:
        est["iw_bound"], var["iw_bound"] = v["log_px"], v["_log_px_var"]
    if "elbo_q" in v:
        for k in ("elbo_q", "elbo_q_star", "amortization_gap"):
            var[k] = v[f"_{k}_var"]
        est["elbo_q"], est["elbo_q_star"] = v["elbo_q"], v["elbo_q_star"]
        est["amortization_gap"] = v["elbo_q_star"] - v["elbo_q"]
        if "log_px_ais" in est:  # independent estimates: their variances add
            est["approximation_gap"] = est["log_px_ais"] - est["elbo_q_star"]
            var["approximation_gap"] = var["log_px_ais"] + var["elbo_q_star"]
    return est, var


@dataclass
class Totals:
    """Per-image sums over the images seen so far (for the means and their standard errors)."""

    n: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    variances: dict[str, float] = field(default_factory=dict)

    def add(self, est: dict[str, Tensor], var: dict[str, Tensor]) -> None:
        for k, t in est.items():
            self.sums[k] = self.sums.get(k, 0.0) + t.sum().item()
            self.variances[k] = self.variances.get(k, 0.0) + var[k].sum().item()
        self.n += next(iter(est.values())).shape[0] if est else 0

    def row(self) -> dict[str, Any]:
        """Means of KEYS in that order, their standard errors ("noise": the square root of the
        summed per-image variances, over the number of images), and the ordering checks."""
        mean = {k: self.sums[k] / self.n for k in KEYS if k in self.sums}
        noise = {k: math.sqrt(self.variances[k]) / self.n for k in KEYS if k in self.variances}
        return {**mean, "noise": noise, **ordering(mean, noise)}


def ordering(mean: dict[str, float], noise: dict[str, float]) -> dict[str, Any]:
    """Whether the inequalities of ORDER hold among the means present: ``ordered`` exactly,
    ``ordered_within_noise`` up to NOISE standard errors of each difference (the estimates of
    the two sides are independent, except ELBO(q*) - ELBO(q), whose own error is the
    amortization gap's)."""
    exact, within = True, True
    for big, small in ORDER:
        if big not in mean or small not in mean:
            continue
        diff = mean[big] - mean[small]
        if (big, small) == ("elbo_q_star", "elbo_q"):
            se = noise["amortization_gap"]
        else:
            se = math.hypot(noise[big], noise[small])
        exact = exact and diff >= 0
        within = within and diff >= -NOISE * se
    return {"ordered": exact, "ordered_within_noise": within}


class Collector:
    """``on_batch`` of the evaluation pass for ``vaelab gap``: one row per image batch, and the
    totals over all images."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.totals = Totals()

    def __call__(self, values: dict[str, Tensor]) -> None:
        est, var = _per_image(values)
        batch = Totals()
        batch.add(est, var)
        self.totals.add(est, var)
        self.batches.append({"images": batch.n, **batch.row()})
