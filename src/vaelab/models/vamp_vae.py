"""The VAE with a VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior"): the prior is
learned, p(z) = 1/K sum_k q(z | u_k), the mixture of the model's own posteriors at K learned
pseudo-inputs u_k.

The prior is ``priors.VampPrior``, built by the ``build_prior`` hook; nothing else changes.

The prior that maximises the ELBO averaged over the data is the aggregate posterior
1/N sum_n q(z|x_n); the VampPrior approximates it with K << N pseudo-inputs, images trained
with the rest of the model. Its KL from q(z|x) has no closed form, so the loss takes it by
Monte Carlo on the draws of z the reconstruction uses: KL_i ~= mean_m [log q(z_m|x_i) -
log p(z_m)] (m = model.mc_samples; one draw, as in the paper, is unbiased). Importance
sampling, AIS and the gap's ELBOs read log p(z) from the same prior, so log p(x) is the learned
model's.

Batch norm: the pseudo-inputs go through the encoder with its batch norms on their running
statistics (eval mode), in training too, and never update them. So the prior is one density
that does not depend on the batch (the same in training, validation and evaluation, and under
torchrun, where each process computes the same prior), and the pseudo-inputs, which are not
data, leave the statistics of the data's batches alone. Encoding them with the batch instead
would make p(z) a function of the batch and mix K pseudo-images into the data's statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from vaelab.config import ModelConfig, require, unused
from vaelab.models import priors, register
from vaelab.models.base import DiagonalGaussian
from vaelab.models.vae import VAE


@dataclass(frozen=True)
class VampVAEConfig(ModelConfig):
    name: str = "vamp_vae"
    # K, the pseudo-inputs (mixture components). They go through the encoder, forward and
    # backward, at every step: K images cost about what K more images of the batch do, so 50
    # adds less than half the default batch of 128 on a CPU. The paper uses 500 for MNIST
    # (model.pseudo_inputs=500).
    pseudo_inputs: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pseudo_inputs >= 1, "model.pseudo_inputs", "an integer >= 1")
        unused(self, "free_bits", "its KL is a Monte Carlo estimate, with no closed form per "
               "latent dimension")  # fmt: skip


@contextlib.contextmanager
def running_statistics(module: nn.Module) -> Iterator[None]:
    """The batch norms of ``module`` in eval mode (normalising with their running statistics,
    which they then leave as they are) inside the block; the rest of the module as it was."""
    norms = [
        m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for m in norms:
        m.train(False)
    try:
        yield
    finally:
        for m in norms:
            m.train(True)


@register("vamp_vae", VampVAEConfig)
class VampVAE(VAE):
    """Logs ``recon`` and ``kl`` (the Monte Carlo KL from the VampPrior); the ELBO is
    -(nll + kl). KL warm-up applies; free bits do not (no per-dimension KL)."""

    def build_prior(self) -> priors.VampPrior:
        cfg: VampVAEConfig = self.cfg  # type: ignore[assignment]
        return priors.VampPrior(cfg.latent_dim, self.shape, cfg.pseudo_inputs, self.encode_prior)

    def encode_prior(self, u: Tensor) -> DiagonalGaussian:
        """q(z|u) for the pseudo-inputs u (K, C, H, W), batch norms on running statistics."""
        with running_statistics(self.encoder):
            return self.encode(u)
