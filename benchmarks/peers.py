"""Training throughput of a peer library's VAE on vaelab's network (run by hand, not a test).

pythae 0.1.2's own ``VAE`` model (https://github.com/clementchadebec/benchmark_VAE) trained
the way pythae's ``BaseTrainer`` does one step, with vaelab's conv encoder and decoder inside
pythae's ``BaseEncoder``/``BaseDecoder``, so the networks are identical and the numbers measure
the two libraries' model and training-step code. Imported by benchmarks/throughput.py.
benchmarks/throughput.py times it beside vaelab's step (its "peer: pythae VAE" rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vaelab.nets.conv import ConvDecoder, ConvEncoder


def pythae_step(
    shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int, batch: int
) -> Callable[[], None] | None:
    """One training step of pythae's ``VAE`` with vaelab's conv networks, as a function to
    time; None without pythae. fp32, NCHW, on the CPU with torch's default thread count.

    Networks: ``vaelab.nets.conv.ConvEncoder(shape, widths, 2 * latent_dim)``, its output split
    into pythae's ``embedding`` (mean) and ``log_covariance`` (log-variance) as vaelab splits it,
    and ``vaelab.nets.conv.ConvDecoder(shape, widths, latent_dim)`` followed by a sigmoid, as
    pythae's ``reconstruction``. pythae's "mse" loss does not itself need outputs in [0, 1],
    but the data are, pythae's own CelebA decoders end in a sigmoid, and vaelab's Gaussian
    decoder mean is the sigmoid of these logits, so both libraries do the same work.

    Loss (pythae/models/vae/vae_model.py, ``VAE.loss_function``, lines 100-122, with
    ``reconstruction_loss="mse"``): per image ``0.5 * sum((recon_x - x) ** 2)`` over pixels
    plus the closed-form ``KL(q(z|x) || N(0, I))``, averaged over the batch: the negative ELBO
    of a unit-variance Gaussian decoder without its constant. (vaelab's celeba_vae config,
    sigma2 = 1/2, weights the squared error by 1 instead of 0.5: a different scale, the same
    computation.) One sample of z per image.

    One step, as ``BaseTrainer.train_step`` and ``_optimizers_step`` do it
    (pythae/trainers/base_trainer/base_trainer.py): ``model(inputs, epoch=..., dataset_size=...,
    uses_ddp=False)``, ``optimizer.zero_grad()``, ``loss.backward()``, ``optimizer.step()``,
    then the per-step host sync ``loss.item()`` and its NaN check. The model is in train mode
    (BatchNorm batch statistics), the optimizer is ``torch.optim.Adam(lr=1e-3)``. The input is
    one fixed batch ``torch.rand(batch, *shape)`` wrapped as pythae's data sets yield it,
    ``DatasetOutput(data=x)``: pythae's data loaders, and its per-step callbacks (the tqdm
    progress bar), are left out, since this compares the step and data loading is measured
    elsewhere.
    """
    try:
        from pythae.data.datasets import DatasetOutput
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except ImportError:
        return None

    class Encoder(BaseEncoder):
        def __init__(self) -> None:
            BaseEncoder.__init__(self)
            self.net = ConvEncoder(shape, widths, 2 * latent_dim)

        def forward(self, x: Tensor) -> ModelOutput:
            mu, logvar = self.net(x).chunk(2, dim=-1)  # (B, d) each
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self) -> None:
            BaseDecoder.__init__(self)
            self.net = ConvDecoder(shape, widths, latent_dim)

        def forward(self, z: Tensor) -> ModelOutput:
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))  # (B, C, H, W)

    torch.manual_seed(0)
    decoder = Decoder()  # decoder first, as vaelab builds them: the same initial weights
    encoder = Encoder()
    config = VAEConfig(input_dim=tuple(shape), latent_dim=latent_dim, reconstruction_loss="mse")
    model = VAE(config, encoder=encoder, decoder=decoder)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = DatasetOutput(data=torch.rand(batch, *shape))

    def step() -> None:
        out = model(inputs, epoch=1, dataset_size=batch, uses_ddp=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss = out.loss.item()
        if loss != loss:
            raise ArithmeticError("NaN in pythae's training loss")

    return step
