"""The ELBO gap taken apart (Cremer et al. 2018, "Inference suboptimality in variational
autoencoders").

For each image, ``optimise_posterior`` fits its own diagonal Gaussian q*(z|x), starting at the
encoder's q(z|x), by Adam on the ELBO. Then

    log p(x) >= ELBO(q*) >= ELBO(q),

so log p(x) - ELBO(q) splits into the approximation gap log p(x) - ELBO(q*) (what no diagonal
Gaussian can close) and the amortization gap ELBO(q*) - ELBO(q) (what one encoder for all
images costs). log p(x) comes from AIS (``vaelab.ais``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.models.base import DiagonalGaussian, GenerativeModel

STEPS = 500  # Adam steps per batch of images
SAMPLES = 16  # z samples per image for each step's ELBO estimate
LR = 0.01


def elbo(model: GenerativeModel, x: Tensor, q: DiagonalGaussian, samples: int) -> Tensor:
    """ELBO(q) per image, (B,): E_q[log p(x|z)] by ``samples`` reparameterised draws, minus the
    closed-form KL(q || N(0, I))."""
    z = q.rsample(samples)  # (samples, B, d)
    log_lik = -model.likelihood.nll(x, model.decode_logits(z))  # (samples, B)
    return log_lik.mean(0) - q.kl()


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
    size falling linearly from ``lr`` to 0. The model's parameters are not changed."""
    mu = q.mu.detach().clone().requires_grad_(True)
    logvar = q.logvar.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, logvar], lr=lr)
    with torch.enable_grad():
        for i in range(steps):
            # the step size falls linearly to 0: the last steps average out the sampling noise
            opt.param_groups[0]["lr"] = lr * (1.0 - i / steps)
            loss = -elbo(model, x, DiagonalGaussian(mu, logvar), samples).sum()
            # gradients of q's parameters only: the model's .grad stay as they are
            mu.grad, logvar.grad = torch.autograd.grad(loss, [mu, logvar])
            opt.step()
    return DiagonalGaussian(mu.detach(), logvar.detach())
