"""The VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") with the
exponential-moving-average codebook of the paper's appendix A.1 (as Razavi et al. 2019 train
it).

The encoder's flat output z_e (B, latent_dim) is read as L = latent_dim / D code vectors of
D = ``model.code_dim`` numbers each; each is replaced by its nearest (Euclidean) of the K =
``model.codebook_size`` codebook vectors e_k, and the decoder sees the quantised z_q. The
gradient of the reconstruction skips the quantisation (straight-through: z_e + sg(z_q - z_e)),
so it reaches the encoder as if z_q were z_e. The codebook is not trained by gradient: each
training step moves it to the running mean of the encoder outputs assigned to each code,

    N_k <- gamma N_k + (1 - gamma) n_k,       m_k <- gamma m_k + (1 - gamma) sum_{i -> k} z_e,i,
    e_k = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace),

with n_k the batch's count of vectors assigned to code k and gamma = ``model.ema_decay``.
N (cluster sizes) and m (sums) are buffers, saved with the weights, so resume is exact; they
start as if each code had been assigned once at its initial place (N = 1, m = e), so e = m / N
holds from the first step. The codebook starts at K encoder outputs of the first training batch
(``start_codebook``). The loss per image is

    recon + commitment_weight * ||z_e - sg(z_q)||^2      (commitment_weight = ``model.commitment``)

Terms (per image, (B,)): ``recon``; ``commitment`` (||z_e - sg(z_q)||^2, summed over the L
vectors); ``perplexity`` (exp of the entropy of the batch's code usage, the same value for
every image of a batch); ``kl`` = L log K, the KL of the deterministic one-hot posterior from the
uniform prior over the K^L code sequences. The ELBO is -nll(x|z_q) - L log K with every constant
of the likelihood: a true lower bound on log p(x) = log sum_c K^-L p(x|z_q(c)) under that
uniform prior. ``logged()`` adds ``dead_codes``: the codes whose EMA cluster size N_k is below
DEAD_BELOW (assigned on average fewer than once in 100 batches).

The latent is discrete (``continuous_latent = False``): importance sampling, AIS, BDMC and the
gap's q* are not defined for it, and evaluation says so instead of computing them. Samples draw
code sequences from a prior fitted to the training codes after training
(``vaelab.samplers.code_prior``); ``model.sample`` draws them from the uniform prior of the ELBO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vaelab import losses
from vaelab.config import ModelConfig, RunConfig, require, unused
from vaelab.models import register
from vaelab.models.base import GenerativeModel, ModelOutput, StepContext, refuse_split
from vaelab.models.priors import Prior, Shape, _lead
from vaelab.nets import build_encoder

EPSILON = 1e-5  # Laplace smoothing of the cluster sizes (the paper's code, Sonnet's default)
DEAD_BELOW = 0.01  # a code whose EMA cluster size is below this is dead (``dead_codes``)


@dataclass(frozen=True)
class VQVAEConfig(ModelConfig):
    name: str = "vq_vae"
    codebook_size: int = 512  # K, the codebook's vectors
    code_dim: int = 4  # D: model.latent_dim is read as latent_dim / D code vectors of D numbers
    commitment: float = 0.25  # the weight of ||z_e - sg(z_q)||^2 (the paper's beta)
    ema_decay: float = 0.99  # gamma of the codebook's moving averages

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.codebook_size >= 2, "model.codebook_size", "an integer >= 2")
        require(self.code_dim >= 1, "model.code_dim", "an integer >= 1")
        require(
            self.latent_dim % self.code_dim == 0,
            "model.code_dim",
            f"a divisor of model.latent_dim={self.latent_dim} (the latent is read as "
            f"latent_dim / code_dim code vectors), got {self.code_dim}",
        )
        require(0 <= self.commitment < math.inf, "model.commitment", "a finite number >= 0")
        require(0 < self.ema_decay < 1, "model.ema_decay", "a number in (0, 1)")
        unused(self, "free_bits", "its KL is the constant L log K, with nothing to keep above")
        unused(self, "mc_samples", "its encoder is deterministic: one z_q per image")


class UniformCodes(Prior):
    """The ELBO's prior: code indices uniform and independent over the L positions, so z is
    uniform over the K^L sequences of codebook vectors. The codebook (K, D) is its support, a
    buffer (``prior.codebook`` in the weights) that the model's EMA updates move."""

    def __init__(self, latent_dim: int, codebook_size: int, code_dim: int) -> None:
        super().__init__(latent_dim)
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.positions = latent_dim // code_dim
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError(
            "a prior over code sequences has no density in z: each of the K^L sequences has "
            "probability K^-L"
        )

    def sample(
        self,
        shape: Shape,
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Uniform code indices, from torch's global generator, as latents (*shape, d); the
        temperature changes nothing (a uniform distribution at any temperature)."""
        lead = _lead(shape)
        idx = torch.randint(self.codebook_size, (*lead, self.positions), device=device)
        z = self.codebook.to(device)[idx].flatten(-2)  # (*shape, L * D)
        return z if dtype is None else z.to(dtype)


class CodePosterior:
    """q(z|x) of a VQ-VAE: one-hot on the nearest code at each position, so z = z_q is a
    function of x. ``mu`` and ``mode()`` are z_q (B, d) (evaluation's active units, the
    reconstructions, ``vaelab encode``, the disentanglement scores read them); ``indices`` (B, L)
    the codes; ``z_e`` (B, L, D) the encoder's output before quantisation."""

    def __init__(self, z_e: Tensor, indices: Tensor, z_q: Tensor, codebook_size: int) -> None:
        self.z_e, self.indices, self.mu = z_e, indices, z_q.flatten(1)
        self.codebook_size = codebook_size

    def mode(self) -> Tensor:
        return self.mu

    def kl(self) -> Tensor:
        """KL(one-hot || uniform over K^L) = L log K per image, (B,)."""
        return self.mu.new_full(
            (self.mu.shape[0],), self.indices.shape[1] * math.log(self.codebook_size)
        )

    def kl_per_dim(self) -> Tensor:
        """The KL spread evenly over the d latent numbers (log K / D each), (B, d): no dimension
        is more informative than another a priori (the report orders traversals by this)."""
        d = self.mu.shape[1]
        return self.kl().unsqueeze(-1).expand(-1, d) / d


@register("vq_vae", VQVAEConfig)
class VQVAE(GenerativeModel):
    """Logs ``recon``, ``commitment``, ``perplexity`` and ``kl`` (= L log K), and ``dead_codes``
    through ``logged()``; the ELBO is -(nll + L log K)."""

    has_encoder = True
    continuous_latent = False

    def __init__(self, cfg: ModelConfig, shape: tuple[int, int, int]) -> None:
        super().__init__(cfg, shape)
        vq: VQVAEConfig = cfg  # type: ignore[assignment]
        self.encoder = build_encoder(cfg, self.shape, cfg.latent_dim)
        # the moving averages of the appendix: cluster sizes N (K,) and sums m (K, D)
        self.register_buffer("ema_cluster_size", torch.ones(vq.codebook_size))
        self.register_buffer("ema_embed_sum", self.prior.codebook.clone())
        # False until the first training batch has set the codebook (``start_codebook``)
        self.register_buffer("codebook_started", torch.zeros((), dtype=torch.bool))

    def build_prior(self) -> UniformCodes:
        vq: VQVAEConfig = self.cfg  # type: ignore[assignment]
        return UniformCodes(vq.latent_dim, vq.codebook_size, vq.code_dim)

    @classmethod
    def check_run(cls, cfg: RunConfig, world_size: int) -> None:
        """KL warm-up is refused (no KL weight: the KL is a constant); so is torchrun, as the
        codebook's moving averages and the perplexity are per process."""
        super().check_run(cfg, world_size)
        refuse_split(cfg, world_size, "the codebook's moving averages and the perplexity are "
                     "statistics of the batch")  # fmt: skip

    # -- codes --------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """e (K, D)."""
        return self.prior.codebook  # type: ignore[return-value]

    @property
    def positions(self) -> int:
        """L, the code vectors per image."""
        return self.cfg.latent_dim // self.cfg.code_dim  # type: ignore[attr-defined]

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size  # type: ignore[attr-defined]

    def encode_continuous(self, x: Tensor) -> Tensor:
        """z_e: the encoder's output as L code vectors, (B, L, D), in fp32 under autocast."""
        z = losses.full_precision(self.encoder(x))
        return z.view(z.shape[0], self.positions, -1)

    @torch.no_grad()
    def nearest(self, z_e: Tensor) -> Tensor:
        """The index of the nearest codebook vector to each of z_e (..., D) -> (...)."""
        e = self.codebook.to(z_e.dtype)
        dist = z_e.square().sum(-1, keepdim=True) - 2 * z_e @ e.T + e.square().sum(-1)
        return dist.argmin(-1)

    def encode(self, x: Tensor) -> CodePosterior:  # type: ignore[override]
        return self.quantise(self.encode_continuous(x))

    def quantise(self, z_e: Tensor) -> CodePosterior:
        """The codes of encoder outputs z_e (B, L, D) and their vectors z_q."""
        idx = self.nearest(z_e)
        return CodePosterior(z_e, idx, self.codebook[idx].to(z_e.dtype), self.codebook_size)

    def code_indices(self, x: Tensor) -> Tensor:
        """The codes of images x: (B, L) int64."""
        return self.nearest(self.encode_continuous(x))

    def decode_codes(self, indices: Tensor) -> Tensor:
        """The latents z_q (..., d) of code indices (..., L)."""
        return self.codebook[indices].flatten(-2)

    # -- the codebook's moving averages ---------------------------------------------------------
    @torch.no_grad()
    def start_codebook(self, z_e: Tensor) -> None:
        """Set the codebook to K of the first training batch's encoder outputs z_e (B, L, D),
        drawn without replacement (with, if the batch holds fewer than K), and the moving
        averages to match (N = 1, m = e). A codebook drawn from N(0, I) would sit far from
        the encoder's first outputs, which would all go to the few nearest codes and leave the
        rest unused from the start (the data-dependent start of Lancucki et al. 2020)."""
        flat = z_e.reshape(-1, z_e.shape[-1])
        k = self.codebook_size
        if len(flat) >= k:
            pick = torch.randperm(len(flat), device=flat.device)[:k]
        else:
            pick = torch.randint(len(flat), (k,), device=flat.device)
        self.codebook.copy_(flat[pick])
        self.ema_embed_sum.copy_(flat[pick])
        self.ema_cluster_size.fill_(1.0)
        self.codebook_started.fill_(True)

    @torch.no_grad()
    def ema_update(self, z_e: Tensor, indices: Tensor) -> None:
        """One EMA step of the codebook on a batch's encoder outputs z_e (B, L, D) and their
        codes (B, L) (appendix A.1; the Laplace smoothing of Sonnet's VectorQuantizerEMA)."""
        vq: VQVAEConfig = self.cfg  # type: ignore[assignment]
        gamma, k = vq.ema_decay, vq.codebook_size
        flat = z_e.reshape(-1, z_e.shape[-1]).to(self.ema_embed_sum.dtype)
        onehot = F.one_hot(indices.reshape(-1), k).to(flat.dtype)  # (B L, K)
        self.ema_cluster_size.mul_(gamma).add_(onehot.sum(0), alpha=1 - gamma)
        self.ema_embed_sum.mul_(gamma).add_(onehot.T @ flat, alpha=1 - gamma)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + EPSILON) / (n + k * EPSILON) * n
        self.codebook.copy_(self.ema_embed_sum / smoothed.unsqueeze(-1))

    def logged(self, batch: int) -> dict[str, Tensor]:
        """The likelihood's scalars and ``dead_codes``: codes with EMA cluster size below
        DEAD_BELOW."""
        dead = (self.ema_cluster_size < DEAD_BELOW).sum().to(self.ema_cluster_size.dtype)
        return {**super().logged(batch), "dead_codes": dead.expand(batch)}

    # -- the objective --------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: StepContext | None = None) -> ModelOutput:
        vq: VQVAEConfig = self.cfg  # type: ignore[assignment]
        z_e = self.encode_continuous(x)  # (B, L, D)
        if self.training and not self.codebook_started:
            self.start_codebook(z_e.detach())
        q = self.quantise(z_e)
        z_q = q.mu.view_as(z_e)  # (B, L, D), no gradient: the codebook is a buffer
        if self.training:  # after the codes were chosen with the codebook as it was
            self.ema_update(z_e.detach(), q.indices)
        z = z_e + (z_q - z_e).detach()  # straight-through: decoder sees z_q, gradient goes to z_e
        recon, nll = self.likelihood.terms(x, self.decode_logits(z.flatten(1).unsqueeze(0)))
        commitment = (z_e - z_q).square().sum((-2, -1))  # ||z_e - sg(e)||^2, (B,)
        usage = F.one_hot(q.indices.reshape(-1), vq.codebook_size).double().mean(0)  # (K,)
        entropy = -(usage * torch.log(usage.clamp_min(1e-30))).sum()
        kl = q.kl()
        terms = {
            "recon": recon[0],
            "commitment": commitment,
            "perplexity": torch.exp(entropy).to(recon.dtype).expand(x.shape[0]),
            "kl": kl,
        }
        loss = recon[0] + vq.commitment * commitment
        return ModelOutput(loss=loss, elbo=-(nll[0] + kl), terms=terms, posterior=q)  # type: ignore[arg-type]
