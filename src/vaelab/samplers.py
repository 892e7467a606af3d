"""Post-hoc samplers: a density fitted to the codes of the training images after training.

A VAE's aggregate posterior q(z) = E_x q(z|x) rarely fills N(0, I): the prior puts mass where
no training image was encoded, and the decoder turns those latents into blurry mixtures of
digits or faces. Ghosh et al. (2020, "From variational to deterministic autoencoders", section
4, "ex-post density estimation") fit a Gaussian mixture to the codes of the training set once
training is over and sample from it instead; they use 10 components with full covariances.

``gmm(run)`` does that here: the posterior means E_q[z|x] of the training split (the codes that
``vaelab encode`` writes, one computation: ``evaluate.posterior_means``), scikit-learn's
``GaussianMixture`` (full covariances, fixed seed), saved with the run in
``samplers/gmm_<K>.safetensors`` (weights, means and Cholesky factors of the covariances in
float64; no pickle) together with how well it fits: the mean log-density of the validation
codes under the mixture and under the prior N(0, I), in nats per image. A sampler fitted to
older weights (another step) is fitted again. Sampling draws a component, then
z = mean + temperature * L eps; the decoder's mean image of z is the sample.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import Tensor

from vaelab import rundir
from vaelab.checkpoint import CheckpointError, _read_safetensors, weights_metadata
from vaelab.config import ConfigError
from vaelab.data import ImageDataset
from vaelab.models.base import GenerativeModel

COMPONENTS = 10  # Ghosh et al. (2020)'s mixture size
SEED = 0
KINDS = ("prior", "gmm")  # --sampler: z ~ N(0, T^2 I), or the fitted mixture


@dataclass
class LatentMixture:
    """A Gaussian mixture over z: ``weights`` (K,), ``means`` (K, d), ``chol`` (K, d, d), the
    lower Cholesky factors of the covariances; float64. ``info``: how it was fitted."""

    weights: Tensor
    means: Tensor
    chol: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def components(self) -> int:
        return int(self.weights.shape[0])

    def sample(self, n: int, temperature: float = 1.0, seed: int = 0) -> Tensor:
        """n latents (n, d) float64: a component k ~ weights, then means[k] + T * chol[k] eps.
        Seeded by ``seed`` alone (torch's global generator is not touched)."""
        gen = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        eps = torch.randn(n, self.means.shape[1], generator=gen, dtype=torch.float64)
        return self.means[k] + temperature * (self.chol[k] @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, z: Tensor) -> Tensor:
        """log of the mixture's density at z (N, d) -> (N,), float64."""
        z = z.to(torch.float64)
        diff = (z[:, None, :] - self.means[None]).unsqueeze(-1)  # (N, K, d, 1)
        chol = self.chol.expand(z.shape[0], *self.chol.shape)
        white = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)  # (N, K, d)
        log_det = torch.log(torch.diagonal(self.chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        d = z.shape[1]
        log_comp = -0.5 * (white**2).sum(-1) - log_det - 0.5 * d * math.log(2 * math.pi)
        return torch.logsumexp(torch.log(self.weights) + log_comp, dim=1)

    def save(self, path: Path) -> None:
        tensors = {"weights": self.weights, "means": self.means, "chol": self.chol}
        metadata = {"format": "vaelab-sampler-1", "info": json.dumps(self.info)}
        rundir.atomic_write(
            path, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata)
        )

    @classmethod
    def load(cls, path: Path) -> LatentMixture:
        """Read a saved mixture (safetensors: no code runs); a CheckpointError naming the file
        when it is not one."""
        tensors, metadata = _read_safetensors(path)
        names = {"weights": 1, "means": 2, "chol": 3}
        if metadata.get("format") != "vaelab-sampler-1" or set(tensors) != set(names):
            raise CheckpointError(
                f"'{path}': expected a vaelab sampler (format vaelab-sampler-1 with tensors "
                "weights, means, chol)"
            )
        if any(tensors[k].dim() != dims for k, dims in names.items()):
            raise CheckpointError(f"'{path}': tensors of unexpected shapes")
        try:
            info = json.loads(metadata.get("info", "{}"))
        except json.JSONDecodeError:
            raise CheckpointError(f"'{path}': its 'info' metadata is not JSON") from None
        t = {k: v.to(torch.float64) for k, v in tensors.items()}
        return cls(t["weights"], t["means"], t["chol"], info)


def path(run: str | Path, components: int) -> Path:
    return Path(run) / rundir.SAMPLERS / f"gmm_{components}.safetensors"


def fit(
    codes: np.ndarray, components: int = COMPONENTS, seed: int = SEED, val: np.ndarray | None = None
) -> LatentMixture:
    """A Gaussian mixture with full covariances fitted by EM (scikit-learn) to ``codes``
    (N, d); ``val`` codes, when given, measure the fit (``info``)."""
    from sklearn.mixture import GaussianMixture

    codes = np.asarray(codes, dtype=np.float64)
    if components > len(codes):
        raise ConfigError(
            f"--components: expected at most the {len(codes)} training images, got {components}"
        )
    gm = GaussianMixture(components, covariance_type="full", random_state=seed, reg_covar=1e-6)
    gm.fit(codes)
    covariances = torch.from_numpy(gm.covariances_)
    mixture = LatentMixture(
        torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_),
        torch.linalg.cholesky(covariances),
        {"components": components, "seed": seed, "fitted_on": len(codes)},
    )  # fmt: skip
    if val is not None:
        z = torch.from_numpy(np.asarray(val, dtype=np.float64))
        prior = -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
        mixture.info["val_log_density"] = float(mixture.log_prob(z).mean())
        mixture.info["val_log_density_prior"] = float(prior.mean())
    return mixture


def gmm(
    run: str | Path,
    model: GenerativeModel,
    train: ImageDataset,
    val: ImageDataset | None = None,
    components: int = COMPONENTS,
) -> LatentMixture:
    """The run's mixture of ``components`` Gaussians: the saved one when it was fitted to the
    run's current weights, else fitted to the posterior means of ``train`` and saved."""
    from vaelab.evaluate import posterior_means

    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ConfigError(f"--components: expected an integer >= 1, got {components!r}")
    if not model.has_encoder:
        raise ConfigError(
            f"--sampler gmm: model '{model.cfg.name}' has no encoder, so there are no codes to "
            "fit a mixture to; use --sampler prior"
        )
    step = weights_metadata(run).get("step")
    saved = path(run, components)
    if saved.is_file():
        mixture = LatentMixture.load(saved)
        if mixture.info.get("step") == step and mixture.means.shape[1] == model.cfg.latent_dim:
            return mixture
    codes = posterior_means(model, train)
    mixture = fit(codes, components, SEED, None if val is None else posterior_means(model, val))
    mixture.info["step"] = step
    mixture.save(saved)
    return mixture
