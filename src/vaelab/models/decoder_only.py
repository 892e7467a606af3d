"""The decoder-only baseline: the motivating failure of the derivation.

No encoder: for each image draw z_1..z_m ~ p(z) and decode. With the squared-error objective
1/m * sum_i ||x - f(z_i)||^2 the best decoder ignores z and outputs the dataset's average image,
because z carries no information about which x it is paired with.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vaelab import losses
from vaelab.config import ModelConfig, require, unused
from vaelab.models import register
from vaelab.models.base import GenerativeModel, ModelOutput, StepContext
from vaelab.rng import batch_randn


@dataclass(frozen=True)
class DecoderOnlyConfig(ModelConfig):
    name: str = "decoder_only"
    # mse: 1/m * sum_i ||x - f(z_i)||^2 (the derivation's objective);
    # marginal: -log 1/m sum_i p(x|z_i), the Monte-Carlo marginal likelihood, via logsumexp.
    objective: str = "mse"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.objective in ("mse", "marginal"), "model.objective", "one of 'mse', 'marginal'"
        )
        unused(self, "free_bits", "it has no encoder, so no KL term")
        if self.objective == "mse":
            # The squared error is the Gaussian's -log p(x|z) up to scale; with a Bernoulli
            # decoder the "mse" loss would silently be the cross-entropy.
            require(
                self.likelihood == "gaussian",
                "model.likelihood",
                "gaussian for model 'decoder_only' with model.objective=mse (a squared error); for "
                "bernoulli set model.objective=marginal",
            )


@register("decoder_only", DecoderOnlyConfig)
class DecoderOnly(GenerativeModel):
    def forward(self, x: Tensor, ctx: StepContext | None = None) -> ModelOutput:
        m, b = self.cfg.mc_samples, x.shape[0]
        z = batch_randn((m, b, self.cfg.latent_dim), 1, device=x.device, dtype=x.dtype)  # (m, B, d)
        logits = self.decode_logits(z)  # (m, B, C, H, W)
        recon, nll = self.likelihood.terms(x, logits)  # (m, B) each
        log_px = losses.log_mean_exp(-nll, dim=0)  # (B,)
        if self.cfg.objective == "marginal":
            loss = -log_px
        else:  # recon is the squared error over 2 sigma2 (the config allows mse only if Gaussian)
            loss = recon.mean(0) * (2.0 * self.cfg.sigma2)
        return ModelOutput(loss=loss, elbo=log_px, terms={"recon": recon.mean(0)})
