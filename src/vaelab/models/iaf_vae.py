"""The VAE with an inverse autoregressive flow posterior (Kingma et al. 2016, "Improved
variational inference with inverse autoregressive flow").

q(z|x) starts as the encoder's diagonal Gaussian, z_0 = mu + sigma_0 * eps, eps ~ N(0, I), and
T IAF steps transform it (the paper's numerically stable update, its eq. 14):

    [m_t, s_t] = MADE_t(z_{t-1}, h),   sigma_t = sigmoid(s_t),
    z_t = sigma_t * z_{t-1} + (1 - sigma_t) * m_t,

with MADE_t a masked autoregressive MLP (Germain et al. 2015): m_t[i] and s_t[i] depend on
z_{t-1}[j] for j before i only, and on the context h, which the encoder outputs beside mu and
log sigma_0^2. The variables' order is reversed from one step to the next. Each step's
Jacobian dz_t/dz_{t-1} is triangular with diagonal sigma_t, so the log density of the flow's
own samples costs nothing extra (the paper's eq. 10):

    log q(z_T|x) = log N(eps; 0, I) - sum_i log sigma_0[i] - sum_t sum_i log sigma_t[i].

``IAFPosterior.rsample_with_log_prob`` returns the samples with that log density. The log
density of any other z needs the flow inverted, which is sequential in d (each step: d MADE
passes): ``log_prob`` does it, exactly, for callers holding a z the flow did not draw.

KL(q || p) has no closed form: the loss takes it by Monte Carlo on the draws of z that the
reconstruction uses, KL_i ~= mean_m [log q(z_m|x_i) - log p(z_m)], with log q of the samples.
Free bits are refused (no KL per latent dimension). Importance sampling weighs the flow's own
samples with their log q (``log_weights``); AIS starts from the prior, since its start from
q(z|x) runs in the whitened coordinates of a diagonal Gaussian (``vaelab.ais.start``); the gap's
q* optimises the base Gaussian's mu and log-variance per image with the flow and its context
held fixed (``vaelab.gap``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab import losses
from vaelab.config import ModelConfig, require, unused
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian, GenerativeModel, ModelOutput, StepContext
from vaelab.models.vae import EVAL_CONTEXT, VAE
from vaelab.nets import build_encoder
from vaelab.rng import batch_randn

# Added to s_t: sigma_t starts near sigmoid(2) = 0.88, each step close to the identity, as the
# paper advises ("sufficiently positive, close to +1 or +2").
FORGET_BIAS = 2.0


@dataclass(frozen=True)
class IAFVAEConfig(ModelConfig):
    name: str = "iaf_vae"
    flow_steps: int = 2  # T, the IAF steps after the base Gaussian
    # units in each of the MADE's two hidden layers, and the size of the encoder's context h
    flow_hidden: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.flow_steps >= 1, "model.flow_steps", "an integer >= 1")
        require(self.flow_hidden >= 1, "model.flow_hidden", "an integer >= 1")
        unused(self, "free_bits", "its KL is a Monte Carlo estimate, with no closed form per "
               "latent dimension")  # fmt: skip


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """The flow in fp32 under bf16/fp16 autocast: log q sums d log sigma per step."""
    with torch.autocast(device.type, enabled=False):
        yield


class MaskedLinear(nn.Linear):
    """A linear map whose weight is multiplied by a fixed 0/1 mask (out, in), a buffer."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """[m, s] (..., d) each from z (..., d) and a context h (..., H), autoregressive in z's
    order: outputs i depend on z[j], j < i, and on h (Germain et al. 2015). Two hidden layers of
    ``hidden`` units, ELU; hidden unit k has degree k mod d (degree 0: context only), input j
    degree j + 1, output i degree i + 1; a connection goes from degree a to b when a <= b
    (into a hidden unit) or a < b (into an output)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        deg_in = torch.arange(1, d + 1)
        deg_hidden = torch.arange(hidden) % d
        deg_out = torch.arange(1, d + 1).repeat(2)  # m, then s
        self.first = MaskedLinear((deg_in[None, :] <= deg_hidden[:, None]).float())
        self.context = nn.Linear(hidden, hidden, bias=False)
        self.second = MaskedLinear((deg_hidden[None, :] <= deg_hidden[:, None]).float())
        self.out = MaskedLinear((deg_hidden[None, :] < deg_out[:, None]).float())

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        a = F.elu(self.first(z) + self.context(h))
        a = F.elu(self.second(a))
        m, s = self.out(a).chunk(2, dim=-1)
        return m, s + FORGET_BIAS


class IAFPosterior:
    """q(z|x): the base Gaussian N(mu, diag exp(logvar)) (B, d) pushed through the IAF steps
    of ``flow`` with the encoder's context h (B, H).

    ``mu``, ``logvar`` and ``std`` are the base Gaussian's, for the code that reads them:
    evaluation's active units (the spread over images of the base means, not of E_q[z]),
    the report's choice of dimensions to traverse (``kl_per_dim``, the base Gaussian's KL per
    dimension). The flow's own KL has no closed form: ``kl()`` raises; the model takes it by
    Monte Carlo.
    """

    def __init__(self, mu: Tensor, logvar: Tensor, h: Tensor, flow: nn.ModuleList) -> None:
        self.mu, self.logvar, self.h, self.flow = mu, logvar, h, flow

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def with_base(self, mu: Tensor, logvar: Tensor) -> IAFPosterior:
        """The same flow and context from another base Gaussian (the gap's q*)."""
        return IAFPosterior(mu, logvar, self.h, self.flow)

    def step(self, t: int, z: Tensor) -> tuple[Tensor, Tensor]:
        """IAF step t on z_{t-1} (..., B, d): z_t and sum_i log sigma_t, (..., B). Odd steps
        read the variables in reverse order (the last one first)."""
        flip = t % 2 == 1
        z = z.flip(-1) if flip else z
        m, s = self.flow[t](z, self.h.expand(*z.shape[:-1], -1))
        sigma = torch.sigmoid(s)
        z = sigma * z + (1 - sigma) * m  # eq. 14
        return (z.flip(-1) if flip else z), F.logsigmoid(s).sum(-1)

    def push(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The IAF steps applied to z_0 (..., B, d): z_T and sum_t sum_i log sigma_t, (..., B)."""
        log_det = z.new_zeros(z.shape[:-1])
        with full_precision(z.device):
            for t in range(len(self.flow)):
                z, log_sigma = self.step(t, z)
                log_det = log_det + log_sigma
        return z, log_det

    def transform(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """z = the flow at base noise eps (..., B, d), and log q(z|x), (..., B)."""
        z, log_det = self.push(self.mu + self.std * eps)
        log_q = losses.standard_normal_log_prob(eps) - 0.5 * self.logvar.sum(-1) - log_det
        return z, log_q

    def rsample_with_log_prob(self, m: int = 1) -> tuple[Tensor, Tensor]:
        """Reparameterised samples (m, B, d) and their log q(z|x), (m, B); the base noise is
        ``batch_randn``'s, as DiagonalGaussian's (sharded and resumed runs draw the same)."""
        eps = batch_randn((m, *self.mu.shape), 1, dtype=self.mu.dtype, device=self.mu.device)
        return self.transform(eps)

    def rsample(self, m: int = 1) -> Tensor:
        return self.rsample_with_log_prob(m)[0]

    def mode(self) -> Tensor:
        """The flow at eps = 0 (the base mean pushed through): the code for reconstructions and
        ``vaelab encode``. Not the mode of q in general, its centre."""
        return self.push(self.mu)[0]

    def invert(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z_0 and sum_t sum_i log sigma_t for z (..., B, d): each step undone by d passes of its
        MADE (after pass k the first k inputs, in the step's order, are exact)."""
        log_det = z.new_zeros(z.shape[:-1])
        d = z.shape[-1]
        with full_precision(z.device):
            for t in reversed(range(len(self.flow))):
                made, flip = self.flow[t], t % 2 == 1
                target = z.flip(-1) if flip else z
                h = self.h.expand(*z.shape[:-1], -1)
                prev = torch.zeros_like(target)
                for _ in range(d):
                    m, s = made(prev, h)
                    sigma = torch.sigmoid(s)
                    prev = (target - (1 - sigma) * m) / sigma
                m, s = made(prev, h)
                log_det = log_det + F.logsigmoid(s).sum(-1)
                z = prev.flip(-1) if flip else prev
        return z, log_det

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z|x) for any z (..., B, d) -> (...,B), by inverting the flow (d MADE passes a
        step). For the flow's own samples ``rsample_with_log_prob`` gives it for free."""
        z0, log_det = self.invert(z)
        eps = (z0 - self.mu) / self.std
        return losses.standard_normal_log_prob(eps) - 0.5 * self.logvar.sum(-1) - log_det

    def kl(self) -> Tensor:
        raise NotImplementedError(
            "KL(q || p) of a flow posterior has no closed form: estimate it by Monte Carlo, "
            "mean [log q(z|x) - log p(z)] on rsample_with_log_prob's draws"
        )

    def kl_per_dim(self) -> Tensor:
        """The base Gaussian's KL from N(0, 1) per dimension, (B, d): not the flow's (which has
        no per-dimension form); for ordering dimensions (the report's traversals)."""
        return losses.gaussian_kl_per_dim(self.mu, self.logvar)


@register("iaf_vae", IAFVAEConfig)
class IAFVAE(VAE):
    """Logs ``recon`` and ``kl`` (Monte Carlo, with the flow's log q of its samples); the ELBO
    is -(nll + kl). KL warm-up applies (``kl_penalty``); free bits do not (no per-dimension
    KL)."""

    gaussian_posterior = False  # AIS starts from the prior (vaelab.ais.start)

    def __init__(self, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
        GenerativeModel.__init__(self, cfg, shape)  # not VAE's: its encoder has no context
        flow: IAFVAEConfig = cfg  # type: ignore[assignment]
        d, hidden = flow.latent_dim, flow.flow_hidden
        # the encoder's output: mu, log sigma_0^2 and the context h
        self.encoder = build_encoder(cfg, self.shape, 2 * d + hidden)
        self.flow = nn.ModuleList(MADE(d, hidden) for _ in range(flow.flow_steps))

    def encode(self, x: Tensor) -> IAFPosterior:  # type: ignore[override]
        d = self.cfg.latent_dim
        out = losses.full_precision(self.encoder(x))  # (B, 2d + H)
        return IAFPosterior(out[:, :d], out[:, d : 2 * d], out[:, 2 * d :], self.flow)

    def log_weights(self, x: Tensor, k: int, q: IAFPosterior | None = None) -> Tensor:  # type: ignore[override]
        """log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x), with the flow's log q of its
        own samples: (k, B)."""
        q = self.encode(x) if q is None else q
        z, log_q = q.rsample_with_log_prob(k)  # (k, B, d), (k, B)
        nll = self.likelihood.nll(x, self.decode_logits(z))
        return -nll + self.prior.log_prob(z) - log_q

    def objective(
        self,
        q: DiagonalGaussian,
        z: Tensor,
        recon: Tensor,
        nll: Tensor,
        ctx: StepContext,
        terms: dict[str, Tensor],
    ) -> Tensor:
        """recon + the KL penalty of the Monte Carlo KL, as one block (no per-dimension KL)."""
        return recon.mean(0) + self.kl_penalty(terms["kl"].unsqueeze(-1), ctx)

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> ModelOutput:
        ctx = EVAL_CONTEXT if ctx is None else ctx
        q = self.encode(x)
        z, log_q = q.rsample_with_log_prob(self.cfg.mc_samples)  # (m, B, d), (m, B)
        recon, nll = self.likelihood.terms(x, self.decode_logits(z))  # (m, B) each
        kl = (log_q - self.prior.log_prob(z)).mean(0)  # Monte Carlo: no closed form
        terms = {"recon": recon.mean(0), "kl": kl}
        loss = self.objective(q, z, recon, nll, ctx, terms)
        return ModelOutput(loss=loss, elbo=-(nll.mean(0) + kl), terms=terms, posterior=q)  # type: ignore[arg-type]
