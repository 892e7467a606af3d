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

A model with a discrete latent (vq_vae: ``continuous_latent`` False) gets ``code_prior(run)``
instead: an autoregressive categorical prior over its L code positions (a MADE, ``CodeMADE``),
fitted by Adam to the codes of the training split, saved in ``samplers/code_prior.safetensors``
(format ``vaelab-code-prior-1``) with the held-out negative log-likelihood of the validation
codes in nats per image under it, under the ELBO's uniform prior (L log K) and under independent
per-position categoricals. For such a model ``--sampler prior`` samples through it
(``latent_sampler``) and ``--sampler gmm`` is refused.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import Tensor, nn

from vaelab import conditions, rundir
from vaelab.checkpoint import CheckpointError, _read_safetensors, weights_metadata
from vaelab.config import ConfigError
from vaelab.data import ImageDataset
from vaelab.models import priors
from vaelab.models.base import GenerativeModel
from vaelab.models.iaf_vae import MaskedLinear
from vaelab.rng import seeded

COMPONENTS = 10  # Ghosh et al. (2020)'s mixture size
SEED = 0
# --sampler: z ~ N(0, T^2 I) (for a discrete latent: the fitted code prior), or the mixture
KINDS = ("prior", "gmm")


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
    codes: np.ndarray,
    components: int = COMPONENTS,
    seed: int = SEED,
    val: np.ndarray | None = None,
    prior: Callable[[Tensor], Tensor] | None = None,
) -> LatentMixture:
    """A Gaussian mixture with full covariances fitted by EM (scikit-learn) to ``codes``
    (N, d); ``val`` codes, when given, measure the fit (``info``): their mean log-density under
    the mixture and under ``prior`` (a model's ``prior.log_prob``; N(0, I) when not given)."""
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
        under = prior or priors.StandardNormal(z.shape[1]).log_prob
        mixture.info["val_log_density"] = float(mixture.log_prob(z).mean())
        mixture.info["val_log_density_prior"] = float(under(z).double().mean())
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
    if not model.continuous_latent:
        raise ConfigError(
            f"--sampler gmm: model '{model.cfg.name}' has a discrete latent, which a Gaussian "
            "mixture does not fit; use --sampler prior (its code prior, fitted to the training "
            "codes)"
        )
    saved = saved_gmm(run, model, components)
    if saved is not None:
        return saved
    step = weights_metadata(run).get("step")
    codes = posterior_means(model, train)
    val_codes = None if val is None else posterior_means(model, val)
    mixture = fit(codes, components, SEED, val_codes, _prior_log_prob(model))
    mixture.info["step"] = step
    mixture.info["prior"] = type(model.prior).__name__  # what val_log_density_prior is under
    mixture.save(path(run, components))
    return mixture


def _prior_log_prob(model: GenerativeModel) -> Callable[[Tensor], Tensor]:
    """log p(z) under the model's own prior (a learned one, vamp_vae's, included), for codes
    (N, d) in float64 on the CPU."""
    param = next(model.parameters())

    def log_prob(z: Tensor) -> Tensor:
        with torch.no_grad():
            return model.prior.log_prob(z.to(param.device, param.dtype)).double().cpu()

    return log_prob


def saved_gmm(run: str | Path, model: GenerativeModel, components: int) -> LatentMixture | None:
    """The run's saved mixture of ``components`` Gaussians when it was fitted to the run's
    current weights (its step) and latent size, and measured against the model's prior (a
    mixture saved before that was recorded was measured against N(0, I), right for every model
    but vamp_vae); None otherwise (nothing is fitted here)."""
    saved = path(run, components)
    if not saved.is_file():
        return None
    mixture = LatentMixture.load(saved)
    step = weights_metadata(run).get("step")
    fits = mixture.info.get("step") == step and mixture.means.shape[1] == model.cfg.latent_dim
    measured = mixture.info.get("prior", "StandardNormal") == type(model.prior).__name__
    return mixture if fits and measured else None


# -- a prior over the codes of a discrete latent (vq_vae) ---------------------------------------
# A VQ-VAE's ELBO takes its codes as uniform and independent (vaelab.models.vq_vae), which the
# codes of real images are not: van den Oord et al. (2017) fit an autoregressive prior to the
# training codes after training (a PixelCNN over their grid of codes) and sample from it. vaelab's
# codes are a sequence of L positions (the flat latent read as L code vectors), so the prior here
# is a MADE over them (Germain et al. 2015): p(c) = prod_i p(c_i | c_<i), each a categorical over
# the K codes whose logits a masked MLP computes from the codes before position i.
CODE_PRIOR_FORMAT = "vaelab-code-prior-1"
CODE_HIDDEN = 256  # units in each of the MADE's two hidden layers
CODE_BATCH = 128
CODE_LR = 1e-3
CODE_MAX_EPOCHS = 100
CODE_PATIENCE = 5  # epochs without a better held-out loss before training stops
CODE_HOLDOUT = 0.1  # share of the training codes held out to choose the epoch


class CodeMADE(nn.Module):
    """Logits (B, L, K) of p(c_i | c_<i) for code sequences c (B, L): a MADE with per-position
    embeddings as its first layer (the masked linear map of a one-hot input), two hidden layers
    of ``hidden`` ReLU units and a masked output layer. Hidden unit h has degree
    1 + h mod (L - 1); input position j degree j + 1, output position i degree i + 1; a
    connection goes from degree a to b when a <= b (into a hidden unit) or a < b (into an
    output), so output i sees positions j < i only, and position 0 is its bias alone."""

    def __init__(self, positions: int, codes: int, hidden: int = CODE_HIDDEN) -> None:
        super().__init__()
        self.positions, self.codes, self.hidden = positions, codes, hidden
        deg_in = torch.arange(1, positions + 1)
        deg_hidden = torch.arange(hidden) % max(positions - 1, 1) + 1
        deg_out = deg_in.repeat_interleave(codes)  # (L K,): position-major, as the view below
        self.embed = nn.Parameter(torch.randn(positions, codes, hidden) / math.sqrt(positions))
        self.register_buffer(
            "mask_in", (deg_in[:, None] <= deg_hidden[None, :]).float(), persistent=False
        )  # (L, H)
        self.bias_in = nn.Parameter(torch.zeros(hidden))
        self.middle = MaskedLinear((deg_hidden[None, :] <= deg_hidden[:, None]).float())
        self.out = MaskedLinear((deg_hidden[None, :] < deg_out[:, None]).float())

    def forward(self, c: Tensor) -> Tensor:
        e = self.embed[torch.arange(self.positions, device=c.device), c]  # (B, L, H)
        h = torch.relu((e * self.mask_in).sum(1) + self.bias_in)
        h = torch.relu(self.middle(h))
        return self.out(h).view(-1, self.positions, self.codes)


def marginal_log_probs(codes: Tensor, k: int) -> Tensor:
    """log p(c_i = k) per position of independent categoricals fitted to ``codes`` (N, L):
    counts plus one (Laplace's rule, so no code of a held-out image has probability 0), (L, K)."""
    counts = F.one_hot(codes, k).sum(0).double() + 1.0  # (L, K)
    return torch.log(counts / counts.sum(-1, keepdim=True))


@dataclass
class CodePrior:
    """An autoregressive prior over code sequences (L positions, K codes): ``net`` (float32,
    CPU; float64 if converted); ``info``: how it was fitted and how well it fits held-out codes."""

    net: CodeMADE
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return self.net.positions

    @property
    def codes(self) -> int:
        return self.net.codes

    @torch.no_grad()
    def log_prob(self, c: Tensor) -> Tensor:
        """log p(c) in nats for code sequences c (N, L) -> (N,), float64."""
        logits = self.net(c.long()).double()
        return torch.log_softmax(logits, -1).gather(-1, c.long().unsqueeze(-1)).sum((-2, -1))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, seed: int = 0) -> Tensor:
        """n code sequences (n, L) int64, position by position, each categorical's logits
        divided by ``temperature``. Seeded by ``seed`` alone (torch's global generator is not
        touched)."""
        gen = torch.Generator().manual_seed(seed)
        c = torch.zeros(n, self.positions, dtype=torch.int64)
        for i in range(self.positions):
            probs = torch.softmax(self.net(c)[:, i].double() / temperature, -1)
            c[:, i] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        return c

    def save(self, path: Path) -> None:
        tensors = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        metadata = {"format": CODE_PRIOR_FORMAT, "info": json.dumps(self.info)}
        rundir.atomic_write(path, st_save(tensors, metadata))

    @classmethod
    def load(cls, path: Path) -> CodePrior:
        """Read a saved code prior (safetensors: no code runs); a CheckpointError naming the
        file when it is not one."""
        tensors, metadata = _read_safetensors(path)
        try:
            info = json.loads(metadata.get("info", "{}"))
        except json.JSONDecodeError:
            raise CheckpointError(f"'{path}': its 'info' metadata is not JSON") from None
        sizes = [info.get(k) if isinstance(info, dict) else None
                 for k in ("positions", "codebook_size", "hidden")]  # fmt: skip
        if metadata.get("format") != CODE_PRIOR_FORMAT or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes
        ):
            raise CheckpointError(
                f"'{path}': expected a vaelab code prior (format {CODE_PRIOR_FORMAT} with "
                "positions, codebook_size and hidden in its info)"
            )
        net = CodeMADE(*sizes)  # type: ignore[arg-type]
        want = {k: v.shape for k, v in net.state_dict().items()}
        if {k: v.shape for k, v in tensors.items()} != want:
            raise CheckpointError(f"'{path}': tensors of unexpected names or shapes")
        net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        return cls(net.eval(), info)


def fit_code_prior(
    codes: Tensor,
    k: int,
    seed: int = SEED,
    val: Tensor | None = None,
    hidden: int = CODE_HIDDEN,
    max_epochs: int = CODE_MAX_EPOCHS,
    lr: float = CODE_LR,
) -> CodePrior:
    """A ``CodeMADE`` fitted by Adam (maximum likelihood) to training codes (N, L) of a K-code
    codebook, in float32 on the CPU, seeded (the same codes give the same prior): trained on
    90% of them, stopped at the epoch whose loss on the other 10% is lowest (after
    CODE_PATIENCE epochs without a better one). It starts at the independent per-position
    categoricals of those codes (the output biases), so it learns only their dependence.
    ``val`` codes, when given, measure it (``info``): the mean negative log-likelihood of the
    held-out codes in nats per image under it (``val_nll_nats``), under the uniform prior of
    the ELBO, L log K (``val_nll_uniform_nats``), and under independent per-position
    categoricals fitted to all the training codes (``val_nll_marginals_nats``)."""
    codes = codes.long().cpu()
    n, positions = codes.shape
    with seeded(seed):
        net = CodeMADE(positions, k, hidden)
        perm = torch.randperm(n)
        held = max(1, round(CODE_HOLDOUT * n)) if n > 1 else 0
        fit_on, stop_on = codes[perm[held:]], codes[perm[:held]]
        if len(stop_on) == 0:
            stop_on = fit_on
        with torch.no_grad():  # start at the per-position marginals: it learns the dependence
            net.out.bias.copy_(marginal_log_probs(fit_on, k).flatten())
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        best, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
        for epoch in range(1, max_epochs + 1):
            net.train()
            order = torch.randperm(len(fit_on))
            for i in range(0, len(fit_on), CODE_BATCH):
                c = fit_on[order[i : i + CODE_BATCH]]
                loss = F.cross_entropy(net(c).flatten(0, 1), c.flatten(), reduction="sum")
                opt.zero_grad(set_to_none=True)
                (loss / len(c)).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                logits = net(stop_on).flatten(0, 1)
                held_loss = F.cross_entropy(logits, stop_on.flatten(), reduction="sum").item()
            if held_loss < best:
                best, best_epoch, best_state = held_loss, epoch, copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= CODE_PATIENCE:
                break
        net.load_state_dict(best_state)
    prior = CodePrior(net.eval(), {
        "positions": positions, "codebook_size": k, "hidden": hidden, "seed": seed,
        "fitted_on": n, "epochs": best_epoch, "lr": lr,
        "holdout_nll_nats": best / len(stop_on),
    })  # fmt: skip
    if val is not None:
        val = val.long().cpu()
        marginal = marginal_log_probs(codes, k)  # (L, K)
        per_position = marginal[torch.arange(positions), val]  # (N_val, L)
        prior.info["val_nll_nats"] = float(-prior.log_prob(val).mean())
        prior.info["val_nll_uniform_nats"] = positions * math.log(k)
        prior.info["val_nll_marginals_nats"] = float(-per_position.sum(-1).mean())
        prior.info["val_images"] = len(val)
    return prior


@torch.no_grad()
def code_indices(model: GenerativeModel, dataset: ImageDataset, batch_size: int = 256) -> Tensor:
    """The codes of every image of ``dataset`` under a model with a discrete latent (its
    ``code_indices``), (N, L) int64 on the CPU; eval mode."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(0, len(dataset), batch_size):
        part = slice(i, i + batch_size)
        with conditions.given(model, dataset, part):
            out.append(model.code_indices(dataset.batch(part, device).to(dtype)).cpu())
    return torch.cat(out)


def code_prior_path(run: str | Path) -> Path:
    return Path(run) / rundir.SAMPLERS / "code_prior.safetensors"


def code_prior(
    run: str | Path, model: GenerativeModel, train: ImageDataset, val: ImageDataset | None = None
) -> CodePrior:
    """The run's code prior: the saved one when it was fitted to the run's current weights (its
    step), else fitted to the codes of ``train`` (measured on those of ``val``) and saved in
    RUN/samplers/code_prior.safetensors. A file there that vaelab did not write is refused
    (``CodePrior.load``), never overwritten."""
    if model.continuous_latent:
        raise ConfigError(
            f"model '{model.cfg.name}' has a continuous latent: a prior over codes is for a "
            "discrete one (vq_vae); use --sampler prior or gmm"
        )
    saved = saved_code_prior(run, model)
    if saved is not None:
        return saved
    val_codes = None if val is None else code_indices(model, val)
    k = model.cfg.codebook_size  # type: ignore[attr-defined]
    prior = fit_code_prior(code_indices(model, train), k, SEED, val_codes)
    prior.info["step"] = weights_metadata(run).get("step")
    prior.save(code_prior_path(run))
    return prior


def saved_code_prior(run: str | Path, model: GenerativeModel) -> CodePrior | None:
    """The run's saved code prior when it was fitted to the run's current weights (its step)
    and codes (positions, K); None otherwise, and for a model with a continuous latent
    (nothing is fitted here)."""
    saved = code_prior_path(run)
    if model.continuous_latent or not saved.is_file():
        return None
    prior = CodePrior.load(saved)
    k = model.cfg.codebook_size  # type: ignore[attr-defined]
    positions = model.cfg.latent_dim // model.cfg.code_dim  # type: ignore[attr-defined]
    fits = (prior.positions, prior.codes) == (positions, k)
    return prior if fits and prior.info.get("step") == weights_metadata(run).get("step") else None


def saved_code_sampler(run: str | Path, model: GenerativeModel) -> CodeSampler | None:
    """``saved_code_prior`` as a sampler (for the report, which never fits one)."""
    prior = saved_code_prior(run, model)
    return None if prior is None else CodeSampler(prior, model)


@dataclass
class CodeSampler:
    """Latents z of a discrete-latent model drawn through its code prior: what
    ``report.pictures.samples`` decodes (``sample(n, temperature, seed)``, as a mixture's)."""

    prior: CodePrior
    model: GenerativeModel

    @property
    def info(self) -> dict[str, Any]:
        return self.prior.info

    def sample(self, n: int, temperature: float = 1.0, seed: int = 0) -> Tensor:
        c = self.prior.sample(n, temperature, seed)
        return self.model.decode_codes(c.to(next(self.model.parameters()).device))


def latent_sampler(
    run: str | Path,
    model: GenerativeModel,
    kind: str,
    train: ImageDataset,
    val: ImageDataset | None = None,
    components: int = COMPONENTS,
) -> LatentMixture | CodeSampler | None:
    """What samples of ``kind`` (--sampler) draw z from: None for "prior" of a model with a
    continuous latent (its own prior, ``model.sample``); the run's Gaussian mixture for "gmm";
    for a model with a discrete latent (vq_vae), "prior" is the run's code prior
    (``code_prior``) and "gmm" is refused."""
    if kind not in KINDS:
        raise ConfigError(f"--sampler: expected one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "gmm":
        return gmm(run, model, train, val, components)
    if model.continuous_latent:
        return None
    return CodeSampler(code_prior(run, model, train, val), model)
