"""The VAE (Kingma & Welling 2014): Gaussian encoder, reparameterised z, closed-form KL.

The KL is the prior's (``self.prior``, vaelab.models.priors): in closed form for the standard
normal, by Monte Carlo on the same draws of z as the reconstruction term for a prior without
one (vamp_vae's mixture), KL_i ~= mean_m [log q(z_m|x_i) - log p(z_m)].

``VAE`` is also the base class of the variants with an encoder: each overrides one hook
(``kl_weight``, ``kl_penalty``, ``objective``, ``build_likelihood``) and adds its terms.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vaelab import losses
from vaelab.config import ConfigError, ModelConfig, RunConfig
from vaelab.models import register
from vaelab.models.base import DiagonalGaussian, GenerativeModel, ModelOutput, StepContext
from vaelab.nets import build_encoder

EVAL_CONTEXT = StepContext()


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    name: str = "vae"


@register("vae", VAEConfig)
class VAE(GenerativeModel):
    has_encoder = True

    def __init__(self, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
        super().__init__(cfg, shape)
        self.encoder = self.make_encoder()

    def make_encoder(self) -> nn.Module:
        """The encoder network (model.net) to the mean and log-variance of q(z|x), (B, 2d)."""
        return build_encoder(self.cfg, self.shape, 2 * self.cfg.latent_dim)

    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        """KL warm-up applies (through ``kl_penalty``); free bits use the batch-mean KL per
        dimension, which torchrun processes would each compute on their share."""
        if world_size > 1 and cfg.model.free_bits > 0:
            raise ConfigError(
                "config key 'model.free_bits': free bits use the batch-mean KL per dimension, "
                "which each torchrun process would compute on its share; expected 0 under "
                "torchrun"
            )

    def encode(self, x: Tensor) -> DiagonalGaussian:
        mu, logvar = losses.full_precision(self.encoder(x)).chunk(2, dim=-1)  # (B, d) each
        return DiagonalGaussian(mu, logvar)

    def log_weights(self, x: Tensor, k: int, q: DiagonalGaussian | None = None) -> Tensor:
        """log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x): (k, B) (Burda et al. 2016),
        log p(z) the model's prior's."""
        q = self.encode(x) if q is None else q
        z = q.rsample(k)  # (k, B, d)
        nll = self.likelihood.nll(x, self.decode_logits(z))
        return -nll + self.prior.log_prob(z) - q.log_prob(z)

    # -- hooks: a variant overrides one of these ---------------------------------------------
    def kl_weight(self) -> float:
        """The weight on KL in the training loss; 1 gives the ELBO (beta-VAE overrides it)."""
        return 1.0

    def kl_penalty(self, kl_dims: Tensor, ctx: StepContext) -> Tensor:
        """The KL part of the training loss from the per-dimension KL (B, d) -> (B,): free bits
        (model.free_bits), then the weight, then KL warm-up (``ctx.kl_anneal``). For a prior
        without a closed-form KL per dimension, ``kl_dims`` is the Monte Carlo KL as one
        block, (B, 1) (such a model refuses free bits)."""
        kl = losses.free_bits_kl(kl_dims, self.cfg.free_bits)
        return ctx.kl_anneal * self.kl_weight() * kl

    def objective(
        self,
        q: DiagonalGaussian,
        z: Tensor,
        recon: Tensor,
        nll: Tensor,
        ctx: StepContext,
        terms: dict[str, Tensor],
    ) -> Tensor:
        """The per-image training loss from the posterior, its samples z (m, B, d) and the
        reconstruction terms per sample (m, B). Default: recon + KL penalty (the ELBO's
        negative, up to a constant, when beta = 1). ``terms``: the output's named per-image
        terms so far (recon, kl); a variant adds the terms its loss is made of (beta_tcvae's
        mi, tc and dim_kl), computed from the same z."""
        kl_dims = self.prior.analytic_kl_per_dim(q)
        if kl_dims is None:  # no closed form (vamp_vae): the Monte Carlo KL, as one block
            kl_dims = terms["kl"].unsqueeze(-1)
        return recon.mean(0) + self.kl_penalty(kl_dims, ctx)

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> ModelOutput:
        ctx = EVAL_CONTEXT if ctx is None else ctx
        q = self.encode(x)
        z = q.rsample(self.cfg.mc_samples)  # (m, B, d)
        recon, nll = self.likelihood.terms(x, self.decode_logits(z))  # (m, B) each
        kl = self.prior.kl(q, z)  # closed form, or mean_m [log q(z|x) - log p(z)]
        terms = {"recon": recon.mean(0), "kl": kl}
        loss = self.objective(q, z, recon, nll, ctx, terms)
        return ModelOutput(loss=loss, elbo=-(nll.mean(0) + kl), terms=terms, posterior=q)
