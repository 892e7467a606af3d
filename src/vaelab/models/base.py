"""What every model shares: the step context, the output record, the posterior, the decoder.

The contract between a model, the trainer and evaluation (docs/extending.md):

- ``forward(x, ctx)`` takes a batch and a ``StepContext`` (the optimizer step, the epoch, the
  KL warm-up) and returns a ``ModelOutput``: the per-image training ``loss``, the ``elbo`` in
  nats with every constant, and ``terms``, a dict of named per-image (B,) tensors. Every term is
  logged in metrics.jsonl, drawn in curves.png, written to TensorBoard and shown in the report,
  so a variant adds a term without an edit anywhere else.
- The model never reads attributes that the trainer sets: what changes from step to step comes
  in ``ctx``.
- ``check_run(cfg, world_size)`` refuses run settings the model cannot honour (KL warm-up
  without a KL weight, a batch statistic split over torchrun processes).
- ``param_groups(train)`` says how Adam trains the parameters: by default one group at
  train.lr; a model with a part trained at its own pace (factor_vae's discriminator) returns a
  group per part, each with its own learning rate and betas.
- A conditional model (``conditions`` non-empty: cvae) reads its condition y, integer indices
  (B, V) of the variables named in ``conditions`` (``vaelab.conditions``), from
  ``with model.given(y):``, which every loop over a dataset wraps around each batch; for any
  other model ``given`` does nothing. Its numbers are then conditional: log p(x | y).
- The decoder likelihood is an object (``vaelab.models.likelihoods``), and so are the prior
  (``vaelab.models.priors``: ``model.prior``, N(0, I) unless ``build_prior`` says otherwise)
  and the posterior (``DiagonalGaussian``); the KL, sampling, importance sampling, AIS and the
  report read only those interfaces.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vaelab import losses
from vaelab.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from vaelab.models import likelihoods, priors
from vaelab.nets import build_decoder
from vaelab.rng import batch_randn

if TYPE_CHECKING:
    from vaelab.data import ImageDataset

# Names a term may not take: the keys of a metrics row and of eval/<split>.json that are not
# terms (the metrics' own outputs are refused when they meet a term: metrics.evaluation_pass).
RESERVED = frozenset(
    {"split", "epoch", "step", "loss", "elbo_nats", "bpd", "seconds"}
    | {"iw_nll_nats", "iw_bpd", "elbo_gap_nats", "active_units", "iw_samples"}
    | {"diversity_ratio", "num_images"}
)


def refuse_split(cfg: RunConfig, world_size: int, why: str) -> None:
    """For ``check_run``: refuse torchrun (world_size > 1) for a model whose per-image terms
    depend on the rest of the batch (``why``), which each process would compute on its share."""
    if world_size > 1:
        raise ConfigError(
            f"config key 'model.name': {cfg.model.name} cannot be split over torchrun processes "
            f"({why}, which each process would compute on its share); train it in one process"
        )


@dataclass(frozen=True)
class StepContext:
    """What a forward pass may depend on besides the batch.

    step: optimizer steps taken before this one (for schedules: KL warm-up, capacity);
    epoch: the epoch being trained (1-based; 0 outside training);
    kl_warmup_steps: train.kl_warmup_steps (0: no warm-up);
    world_size: the processes the global batch is split over (torchrun; 1 in one process), each
    holding rows rank::world_size of it;
    dataset_size: images in the training split (for estimators of the aggregate posterior,
    beta_tcvae's minibatch-weighted sampling; 0: not known, as in a plain ``model(x)``).
    Validation and ``vaelab evaluate`` pass the checkpoint's step and epoch, so their losses
    agree.
    """

    step: int = 0
    epoch: int = 0
    kl_warmup_steps: int = 0
    world_size: int = 1
    dataset_size: int = 0

    @property
    def kl_anneal(self) -> float:
        """The KL warm-up factor for this step (losses.kl_warmup)."""
        return losses.kl_warmup(self.step, self.kl_warmup_steps)


@dataclass(frozen=True)
class ModelOutput:
    """What a forward pass returns; every tensor is per image, shape (B,).

    loss:  the objective that training minimises (may weight terms, e.g. beta * kl).
    elbo:  a lower bound on log p(x) in nats with every constant included (for decoder_only,
           the Monte-Carlo estimate log 1/m sum_i p(x|z_i), a bound in expectation).
    terms: named per-image terms, logged and drawn as they are: ``recon`` (-log p(x|z) without
           its constant, averaged over the m samples of z), ``kl`` (KL(q(z|x) || p(z)) in nats)
           and whatever a variant adds. Averaging over the batch is the caller's job.
    posterior: q(z|x) of this batch (None without an encoder), so evaluation's metrics read the
           encoding the forward pass made instead of encoding again.
    """

    loss: Tensor
    elbo: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    posterior: DiagonalGaussian | None = None


class DiagonalGaussian:
    """q(z|x) = N(mu, diag exp(logvar)), each (B, d)."""

    def __init__(self, mu: Tensor, logvar: Tensor) -> None:
        self.mu = mu
        self.logvar = logvar

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self, m: int = 1) -> Tensor:
        """Reparameterised samples z = mu + sigma * eps, (m, B, d)."""
        eps = batch_randn((m, *self.mu.shape), 1, dtype=self.mu.dtype, device=self.mu.device)
        return self.mu + self.std * eps

    def mode(self) -> Tensor:
        return self.mu

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per image, (B,)."""
        return losses.gaussian_kl(self.mu, self.logvar)

    def kl_per_dim(self) -> Tensor:
        """KL(q_j || N(0, 1)) per image and latent dimension, (B, d)."""
        return losses.gaussian_kl_per_dim(self.mu, self.logvar)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z|x) for z of shape (..., B, d) -> (..., B)."""
        return losses.gaussian_log_prob(z, self.mu, self.logvar)


class GenerativeModel(nn.Module):
    """A decoder p(x|z) under a prior p(z), ``self.prior`` (``build_prior``: N(0, I) unless a
    variant says otherwise). Subclasses define ``forward``.

    Subclass ``VAE`` (vaelab.models.vae) for a model with a Gaussian encoder; register it with
    ``vaelab.models.register(name)``.
    """

    has_encoder: bool = False
    # Whether z is continuous, with a density under the prior and the posterior (log p(z),
    # log q(z|x), gradients in z): what importance sampling, AIS, BDMC and the gap's q* need.
    # False for a discrete latent (vq_vae's code indices): ``vaelab evaluate`` reports its ELBO
    # and terms and records why those estimators are skipped (``likelihood_skipped``), ``vaelab
    # gap`` and ``--bdmc`` refuse the run, and samples come from a prior over the codes fitted
    # after training (``vaelab.samplers.code_prior``, which reads the model's
    # ``code_indices(x)`` and ``decode_codes(indices)``).
    continuous_latent: bool = True
    # The variables a conditional model is given with each image, (name, number of values)
    # each, and the kind of labels they are (``vaelab.conditions``); () for other models.
    conditions: tuple[tuple[str, int], ...] = ()
    condition_on: str = ""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.shape = tuple(shape)
        self.decoder = self.make_decoder()
        self.likelihood = self.build_likelihood()
        self.prior = self.build_prior()

    def make_decoder(self) -> nn.Module:
        """The decoder network (model.net); a variant whose decoder takes more than z (cvae's
        condition) builds it for its own input size."""
        return build_decoder(self.cfg, self.shape)

    @contextlib.contextmanager
    def given(self, y: Tensor) -> Iterator[None]:
        """Condition the forward pass, encoding, decoding and sampling inside the block on y
        (B, V) (``vaelab.conditions``); a model without ``conditions`` ignores it."""
        yield

    def build_likelihood(self) -> likelihoods.Likelihood:
        """The decoder likelihood (model.likelihood, model.sigma2); a variant may return its own."""
        return likelihoods.from_config(self.cfg.likelihood, self.cfg.sigma2)

    def build_prior(self) -> priors.Prior:
        """The prior p(z) (``vaelab.models.priors``); a variant may return its own (vamp_vae).
        Called after the decoder and the likelihood are built, before a subclass's own
        ``__init__`` goes on (the encoder of ``VAE`` does not exist yet)."""
        return priors.StandardNormal(self.cfg.latent_dim)

    @classmethod
    def complete_config(cls, cfg: ModelConfig, train: ImageDataset) -> ModelConfig:
        """The model config with what it reads from the training data filled in (cvae: its
        condition's variables), before the model is built; checked against the data when
        already filled (a resumed run). Base: ``cfg`` unchanged."""
        return cfg

    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        """Refuse (ConfigError) run settings this model cannot honour, before anything is built.
        Base: train.kl_warmup_steps needs a model that weights a KL term."""
        if cfg.train.kl_warmup_steps:
            raise ConfigError(
                f"config key 'train.kl_warmup_steps': expected 0 for model '{cfg.model.name}' "
                "(its objective has no KL weight to warm up)"
            )

    def param_groups(self, train: TrainConfig) -> list[dict[str, Any]]:
        """Adam's parameter groups, each a dict of "params" and the settings it overrides
        ("lr", "betas"; the rest are train's). Every parameter in exactly one group. "lr" is the
        group's base rate, which train.lr_schedule scales; Adam keeps its state per parameter,
        so a group with its own "lr" and "betas" is an optimizer of its own, saved and resumed
        with the run's. Base: one group of every parameter at train.lr."""
        return [{"params": list(self.parameters()), "lr": train.lr}]

    @property
    def num_dims(self) -> int:
        return math.prod(self.shape)

    # -- decoder likelihood -------------------------------------------------------------
    def bits_per_dim(self, log_px_nats: float) -> float:
        """Bits per dimension from a per-image log-likelihood (or bound) in nats: the
        likelihood's own conversion (docs/science.md)."""
        return self.likelihood.bits_per_dim(log_px_nats, self.num_dims)

    def logged(self, batch: int) -> dict[str, Tensor]:
        """Scalars of the model (by default its likelihood's: a learned variance) as per-image
        (B,) values, which every metrics row adds to the forward pass's terms
        (``metrics.output_terms``): logged and drawn like any term."""
        return {k: v.detach().expand(batch) for k, v in self.likelihood.logged().items()}

    # -- generation ---------------------------------------------------------------------
    def decode_logits(self, z: Tensor) -> Tensor:
        """z (..., d) -> logits (..., C, H, W), in fp32 even under bf16 autocast: the losses
        sum thousands of pixels, which bf16's 8-bit mantissa would round away."""
        lead = z.shape[:-1]
        logits = self.decoder(z.reshape(-1, z.shape[-1]))
        return losses.full_precision(logits).reshape(*lead, *self.shape)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1] for latents z (B, d) -> (B, C, H, W)."""
        return self.likelihood.mean(self.decode_logits(z))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """n images (decoder means) for z ~ p(z), each of the prior's components' spread scaled
        by ``temperature`` (N(0, temperature^2 I) for the standard normal), (n, C, H, W)."""
        param = next(self.parameters())
        z = self.prior.sample(n, temperature, device=param.device)
        return self.decode(z.to(param.dtype))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        raise NotImplementedError(f"model '{self.cfg.name}' has no encoder")

    def code_indices(self, x: Tensor) -> Tensor:
        """A discrete latent's code indices of images x, (B, L) (``continuous_latent`` False)."""
        raise NotImplementedError(f"model '{self.cfg.name}' has no discrete codes")

    def decode_codes(self, indices: Tensor) -> Tensor:
        """The latents z (B, d) of code indices (B, L), for the decoder."""
        raise NotImplementedError(f"model '{self.cfg.name}' has no discrete codes")

    def log_weights(self, x: Tensor, k: int, q: DiagonalGaussian | None = None) -> Tensor:
        """Importance log-weights log p(x|z_k) + log p(z_k) - log r(z_k|x) for k samples from a
        proposal r, (k, B); log p(x) ~= logmeanexp over k. Without an encoder the proposal is
        the prior, so the weights are log p(x|z_k), z_k ~ p(z). ``q``: the batch's posterior
        if already computed (models with an encoder)."""
        z = self.prior.sample((k, x.shape[0]), device=x.device, dtype=x.dtype)  # (k, B, d)
        return -self.likelihood.nll(x, self.decode_logits(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at the posterior mean: x (B, C, H, W) -> (B, C, H, W)."""
        return self.decode(self.encode(x).mode())

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> ModelOutput:
        """The batch's ``ModelOutput``; ``ctx`` None is evaluation's default context."""
        raise NotImplementedError
