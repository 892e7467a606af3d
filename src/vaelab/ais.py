"""Annealed importance sampling (AIS) of log p(x) with Hamiltonian Monte Carlo transitions.

The estimator of Neal (2001), as Wu et al. (2017, "On the quantitative analysis of
decoder-based generative models") run it for VAEs. Intermediate targets on the geometric path
from the prior to the posterior,

    f_t(z) = p(z) p(x|z)^beta_t,   0 = beta_0 < beta_1 < ... < beta_T = 1,

with a sigmoidal schedule of the betas. Each chain starts at z ~ p(z); at step t its log weight
gains (beta_t - beta_{t-1}) log p(x|z), then one HMC transition (``leapfrog`` steps of size
``eps``, a Metropolis correction) leaves f_t invariant. The mean of exp(log weight) over chains
is an unbiased estimate of p(x), so its log is a stochastic lower bound of log p(x) (Jensen),
tight as T grows. Each image's step size (shared by its chains) moves towards an acceptance
rate of ``TARGET_ACCEPT``.

Run in reverse from an exact sample of the posterior (data simulated from the model: z ~ p(z),
x ~ p(x|z)), the same chains give a stochastic upper bound: the two bracket log p(x)
(bidirectional Monte Carlo, Grosse et al. 2015), and their difference bounds either's error.

Everything here works on a generic ``log_likelihood(z) -> (N,)`` for z (N, d) with a start
distribution p(z) given by its potential energy -log p(z) (``Energy``; the standard normal's
by default), so it is tested on a model whose log p(x) is known exactly (probabilistic PCA);
``model_log_likelihood`` adapts a vaelab model and a batch of images, all chains and images in
one tensor. The model's prior is ``model.prior``: from q(z|x) (``whitened_log_weight``) its
log density is part of the annealed factor; from the prior, the chains start at exact draws of
it and its energy is part of the HMC potential (``prior_energy``: the standard normal's closed
form, or autograd through any other prior's log density, a VampPrior's mixture). Either way the
weights estimate p(x) under the learned prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab import losses
from vaelab.models import priors
from vaelab.models.base import DiagonalGaussian, GenerativeModel

TARGET_ACCEPT = 0.65  # HMC's optimal acceptance rate (Neal 2011); Wu et al. adapt towards it
LEAPFROG = 10  # leapfrog steps per HMC transition
INITIAL_STEP = 0.1  # leapfrog step size each image starts with (the prior's scale is 1)
MIN_STEP, MAX_STEP = 1e-4, 1.0  # the step sizes adaptation may reach
ADAPT = 1.02  # per transition, an image's step grows by this factor (or shrinks by its inverse)

LogLikelihood = Callable[[Tensor], Tensor]
# z (N, d) -> (U(z), grad U(z)): the start distribution's potential energy -log p(z) (any
# constant dropped) and its gradient, each chain's.
Energy = Callable[[Tensor], tuple[Tensor, Tensor]]


def standard_normal_energy(z: Tensor) -> tuple[Tensor, Tensor]:
    """-log N(z; 0, I) without its constant, |z|^2 / 2, and its gradient z."""
    return 0.5 * z.square().sum(-1), z


def prior_energy(prior: priors.Prior) -> Energy:
    """The energy -log p(z) of a model's prior: the standard normal's closed form, or autograd
    through ``prior.log_prob`` (a prior held fixed: ``Prior.fixed``)."""
    if isinstance(prior, priors.StandardNormal):
        return standard_normal_energy

    def energy(z: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            u = -prior.log_prob(z)
            (grad,) = torch.autograd.grad(u.sum(), z)
        return u.detach(), grad

    return energy


def sigmoid_schedule(steps: int, rad: float = 4.0) -> Tensor:
    """T + 1 betas from 0 to 1, dense at both ends: a sigmoid of an even grid on
    [-rad, rad], rescaled to span [0, 1] exactly (Wu et al. 2017)."""
    if steps < 1:
        raise ValueError(f"AIS needs at least 1 step, got {steps}")
    s = torch.sigmoid(torch.linspace(-rad, rad, steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def log_mean_exp_variance(lse: Tensor, lse_sq: Tensor, k: int) -> Tensor:
    """The variance of log(mean of k weights w), the log of an importance or AIS estimate, by
    the delta method: Var[w] / (k E[w]^2), from ``lse`` = logsumexp(log w) and ``lse_sq`` =
    logsumexp(2 log w). It equals 1 / ESS - 1 / k, ESS = (sum w)^2 / sum w^2 the weights'
    effective sample size: 0 when the weights are equal, near 1 (nats^2) when one dominates. An
    estimate from the same weights, so it misses what none of them reached."""
    return ((lse_sq - 2 * lse + math.log(k)).exp() - 1) / k


@dataclass
class AISResult:
    """Per-chain log weights (chains, B), the direction the chains ran, and the mean
    acceptance rate of their HMC transitions."""

    log_weights: Tensor
    reverse: bool
    accept_rate: float

    def log_px(self) -> Tensor:
        """The estimate of log p(x), (B,), from all chains together: logmeanexp of the forward
        weights (which estimate p(x) without bias), or -logmeanexp of the reverse ones (which
        estimate 1 / p(x) without bias). A stochastic lower (forward) or upper (reverse) bound,
        the tightest these chains give."""
        k = math.log(self.log_weights.shape[0])
        if self.reverse:
            return -(torch.logsumexp(self.log_weights, 0) - k)
        return torch.logsumexp(self.log_weights, 0) - k

    def variance(self) -> Tensor:
        """The variance of ``log_px`` per image, (B,), by the delta method over the chains
        (``log_mean_exp_variance``)."""
        w = self.log_weights.double()
        k = w.shape[0]
        return log_mean_exp_variance(torch.logsumexp(w, 0), torch.logsumexp(2 * w, 0), k)

    def bound(self) -> Tensor:
        """The bidirectional Monte Carlo bound of log p(x), (B,): the mean over chains of the
        log weights, a lower bound in expectation for forward chains and (negated) an upper
        bound for reverse ones, with less noise than ``log_px`` (Grosse et al. 2015). Forward
        minus reverse, their gap bounds the error of either."""
        mean = self.log_weights.mean(0)
        return -mean if self.reverse else mean


def _log_lik_and_grad(log_lik: LogLikelihood, z: Tensor) -> tuple[Tensor, Tensor]:
    """log p(x|z) per chain and its gradient in z: one decoder pass, forward and backward."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        ll = log_lik(z)
        (grad,) = torch.autograd.grad(ll.sum(), z)
    return ll.detach(), grad


def _hmc(
    log_lik: LogLikelihood,
    z: Tensor,
    beta: float,
    eps: Tensor,
    state: tuple[Tensor, Tensor],
    energy: Energy = standard_normal_energy,
) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    """One HMC transition of every chain, leaving f(z) = p(z) p(x|z)^beta invariant: the
    potential is U(z) - beta log p(x|z), U = -log p(z) (``energy``; |z|^2 / 2 for the standard
    normal). ``state``: log p(x|z) and its gradient at z. Returns the new z, its state, and
    which chains accepted."""
    ll0, g0 = state
    u0, gu0 = energy(z)
    e = eps.unsqueeze(-1)
    p0 = torch.randn_like(z)
    p = p0 - 0.5 * e * (gu0 - beta * g0)
    z1, ll1, g1, u1, gu1 = z, ll0, g0, u0, gu0
    for i in range(LEAPFROG):
        z1 = z1 + e * p
        ll1, g1 = _log_lik_and_grad(log_lik, z1)
        u1, gu1 = energy(z1)
        if i < LEAPFROG - 1:
            p = p - e * (gu1 - beta * g1)
    p = p - 0.5 * e * (gu1 - beta * g1)
    h0 = u0 - beta * ll0 + 0.5 * p0.square().sum(-1)
    h1 = u1 - beta * ll1 + 0.5 * p.square().sum(-1)
    log_ratio = torch.nan_to_num(h0 - h1, nan=-math.inf)  # a diverged trajectory: rejected
    accept = torch.log(torch.rand_like(log_ratio)) < log_ratio
    keep = accept.unsqueeze(-1)
    return (
        torch.where(keep, z1, z),
        (torch.where(accept, ll1, ll0), torch.where(keep, g1, g0)),
        accept,
    )


def ais(
    log_lik: LogLikelihood,
    z0: Tensor,
    steps: int,
    reverse: bool = False,
    on_step: Callable[[int], object] | None = None,
    energy: Energy = standard_normal_energy,
) -> AISResult:
    """AIS from z0 (chains, B, d): forward from exact samples of the start distribution p(z)
    (``energy``: its -log p(z) and gradient, the standard normal's by default), or ``reverse``
    from exact posterior samples (the schedule then runs from beta 1 to 0). ``log_lik`` maps
    z (N, d) to log p(x|z) (N,), N = chains x B, chain-major. ``on_step(1)`` after each
    transition."""
    chains, b, d = z0.shape
    betas = sigmoid_schedule(steps).tolist()
    if reverse:
        betas = betas[::-1]
    z = z0.reshape(chains * b, d)
    eps = torch.full((b,), INITIAL_STEP, dtype=z.dtype, device=z.device)  # one per image
    log_w = torch.zeros(chains * b, dtype=torch.float64, device=z.device)
    state = _log_lik_and_grad(log_lik, z)
    accepted = torch.zeros((), dtype=torch.float64, device=z.device)
    for t in range(1, steps + 1):
        # the weight's increment at the current z, then a transition that leaves f_t invariant
        log_w += (betas[t] - betas[t - 1]) * state[0].double()
        z, state, accept = _hmc(log_lik, z, betas[t], eps.repeat(chains), state, energy)
        rate = accept.to(eps.dtype).view(chains, b).mean(0)  # over the image's chains
        eps = (eps * torch.where(rate > TARGET_ACCEPT, ADAPT, 1.0 / ADAPT)).clamp(
            MIN_STEP, MAX_STEP
        )
        accepted += accept.double().mean()
        if on_step is not None:
            on_step(1)
    return AISResult(log_w.view(chains, b), reverse, (accepted / steps).item())


def model_log_likelihood(model: GenerativeModel, x: Tensor, chains: int) -> LogLikelihood:
    """log p(x|z) of a vaelab model for z (chains x B, d), chain-major: row c B + i is image i."""
    b = x.shape[0]

    def log_lik(z: Tensor) -> Tensor:
        logits = model.decode_logits(z.view(chains, b, -1))
        return -model.likelihood.nll(x, logits).reshape(chains * b)

    return log_lik


def whitened_log_weight(
    model: GenerativeModel, x: Tensor, q: DiagonalGaussian, chains: int
) -> LogLikelihood:
    """AIS from q(z|x) instead of the prior, as AIS from a standard normal: in the coordinates
    u = (z - mu) / sigma of each image's q, q is N(0, I), and the annealed factor is the
    importance weight log p(x|z) + log p(z) - log q(z|x) at z = mu + sigma u (the Jacobian of
    the change of variables cancels between target and start). So ``ais`` runs unchanged,
    its HMC steps scaled to q's widths in each dimension, and its weights still estimate
    p(x). log p(z) is the model's prior's (held fixed: ``Prior.fixed``)."""
    log_lik = model_log_likelihood(model, x, chains)
    prior = model.prior.fixed()
    mu, std = q.mu.repeat(chains, 1), q.std.repeat(chains, 1)  # chain-major, like z
    log_det = 0.5 * q.logvar.sum(-1).repeat(chains)  # sum_j log sigma_j per row

    def log_weight(u: Tensor) -> Tensor:
        z = mu + std * u
        log_q = losses.standard_normal_log_prob(u) - log_det  # log q(z|x) at z = mu + sigma u
        return log_lik(z) + prior.log_prob(z) - log_q

    return log_weight


def start(model: GenerativeModel) -> str:
    """Where AIS of ``model`` starts: "q" (its encoder's q(z|x), a diagonal Gaussian, in whose
    whitened coordinates the chains run: ``whitened_log_weight``) or "prior" (no encoder, or a
    posterior that is not a diagonal Gaussian, whose class says ``gaussian_posterior = False``:
    iaf_vae's flow)."""
    return "q" if model.has_encoder and getattr(model, "gaussian_posterior", True) else "prior"


def model_ais(
    model: GenerativeModel,
    x: Tensor,
    chains: int,
    steps: int,
    z0: Tensor | None = None,
    on_step: Callable[[int], object] | None = None,
    q: DiagonalGaussian | None = None,
) -> AISResult:
    """AIS of a vaelab model on images x (B, C, H, W), ``chains`` per image: forward from the
    model's prior (``model.prior``), or from ``q`` (the encoder's q(z|x):
    ``whitened_log_weight``: a ``DiagonalGaussian``); given ``z0`` (B, d) (an exact posterior
    sample of each image: the z that made it), reverse from there to the same start."""
    if q is not None and not isinstance(q, DiagonalGaussian):
        raise TypeError(
            f"AIS from q(z|x) needs a diagonal Gaussian, got {type(q).__name__}: start from the "
            "prior (q=None; ais.start says which a model takes)"
        )
    shape = (chains, x.shape[0], model.cfg.latent_dim)
    if q is None:
        prior = model.prior.fixed()
        log_lik, start, energy = model_log_likelihood(model, x, chains), z0, prior_energy(prior)
    else:  # whitened: the start is N(0, I) in u, whatever the prior
        log_lik, energy = whitened_log_weight(model, x, q, chains), standard_normal_energy
        start = None if z0 is None else (z0 - q.mu) / q.std
    if start is None:
        if q is None:
            u = prior.sample(shape[:-1], device=x.device, dtype=x.dtype)  # exact draws of p(z)
        else:
            u = torch.randn(shape, device=x.device, dtype=x.dtype)
        return ais(log_lik, u, steps, on_step=on_step, energy=energy)
    return ais(log_lik, start.expand(shape).clone(), steps, reverse=True, on_step=on_step,
               energy=energy)  # fmt: skip
