"""The evaluation room: the importance-sampled likelihood where log p(x) is known exactly, and
the metrics of a trained run."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

import vaelab
from tests.conftest import tiny_config
from vaelab import ais
from vaelab.config import ConfigError
from vaelab.evaluate import evaluate, evaluate_model, posterior_means, simulated_bdmc
from vaelab.metrics import importance_estimate
from vaelab.models import likelihoods
from vaelab.models.base import DiagonalGaussian
from vaelab.models.vae import VAE, VAEConfig

K_DIMS, D = 6, 2


class Unsquashed(likelihoods.FixedGaussian):
    """N(x; logits, sigma2 I): a linear decoder's mean is not squashed."""

    def mean(self, logits):
        return logits


class LinearGaussianVAE(VAE):
    """Probabilistic PCA as a VAE: p(z) = N(0, I), p(x|z) = N(Wz + b, sigma2 I), so
    p(x) = N(b, W W^T + sigma2 I) exactly. q(z|x) is the exact posterior's mean with the
    diagonal of its covariance: a diagonal approximation of a correlated posterior, so the ELBO
    sits strictly below log p(x) and the importance sampler has a gap to close."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, sigma2: float) -> None:
        cfg = VAEConfig(net="mlp", widths=(4,), latent_dim=D, sigma2=sigma2, mc_samples=200)
        super().__init__(cfg, (1, 1, K_DIMS))
        self.w, self.b = w, b
        self.decoder = nn.Identity()  # decode_logits is overridden below

    def decode_logits(self, z):
        lead = z.shape[:-1]
        return (z @ self.w.T + self.b).view(*lead, *self.shape)

    def build_likelihood(self):
        return Unsquashed(self.cfg.sigma2)

    def encode(self, x):
        flat = x.flatten(1) - self.b
        s2 = self.cfg.sigma2
        cov = s2 * torch.linalg.inv(self.w.T @ self.w + s2 * torch.eye(D))
        mu = flat @ self.w @ cov / s2
        return DiagonalGaussian(mu, torch.diagonal(cov).log().expand_as(mu))

    def exact_log_px(self, x):
        cov = self.w @ self.w.T + self.cfg.sigma2 * torch.eye(K_DIMS)
        return MultivariateNormal(self.b, cov).log_prob(x.flatten(1))


def importance_log_likelihood(model, x, k):
    """The importance-sampled log p(x) alone (``importance_estimate`` also gives its variance)."""
    return importance_estimate(model, x, k)[0]


def test_importance_sampling_recovers_the_exact_likelihood_of_a_linear_gaussian_model():
    torch.manual_seed(0)
    w = torch.tensor([[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.5, 0.4], [0.9, 1.0], [1.2, 1.0]])
    model = LinearGaussianVAE(w, torch.linspace(-0.5, 0.5, K_DIMS), sigma2=0.1).eval()
    z = torch.randn(64, D)
    x = (z @ w.T + model.b + 0.1**0.5 * torch.randn(64, K_DIMS)).view(64, 1, 1, K_DIMS)
    exact = model.exact_log_px(x)
    for batch in x.split(16):
        estimate = importance_log_likelihood(model, batch, 1000)
        elbo = model(batch).elbo  # 200 samples of z per image
        truth = model.exact_log_px(batch)
        assert (estimate - truth).abs().max() < 0.5
        assert elbo.mean() <= estimate.mean()
        assert elbo.mean() < truth.mean() - 0.1  # the diagonal posterior leaves a real gap
    # With a single sample the estimator is the ELBO in expectation, far from the truth.
    one = importance_log_likelihood(model, x, 1)
    assert (one.mean() - exact.mean()).abs() > 0.1
    assert (importance_log_likelihood(model, x, 1000).mean() - exact.mean()).abs() < 0.05


def test_chunks_combine_to_the_whole_log_mean_exp_and_its_variance(monkeypatch):
    log_w = torch.randn(64, 4) * 30  # widely spread weights: the combination must be stable

    class Weights:
        """A stand-in model whose log-weights are fixed numbers, handed out in order."""

        num_dims = 64

        def __init__(self):
            self.used = 0

        def log_weights(self, x, k, q=None):
            self.used += k
            return log_w[self.used - k : self.used]

    w = log_w.double().exp()  # the estimate and its delta-method variance, summed in float64
    expected = (torch.logsumexp(log_w.double(), 0) - math.log(64),
                w.var(0, correction=0) / (64 * w.mean(0).square()))  # fmt: skip
    for a, b in zip(importance_estimate(Weights(), torch.zeros(4, 1), 64), expected, strict=True):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr("vaelab.metrics.MAX_ELEMENTS", 4 * 64 * 5)  # chunks of 5 samples
    chunked = Weights()
    for a, b in zip(importance_estimate(chunked, torch.zeros(4, 1), 64), expected, strict=True):
        torch.testing.assert_close(a, b)
    assert chunked.used == 64


def test_evaluate_writes_every_documented_key(runs):
    made, splits = runs
    result = evaluate(made["vae"], "val", iw_samples=20, progress=False, splits=splits)
    keys = {"elbo_nats", "bpd", "recon", "kl", "iw_nll_nats", "elbo_gap_nats", "kl_per_dim"}
    keys |= {"active_units", "diversity_ratio", "mse_per_pixel", "psnr", "num_images", "seconds"}
    assert keys <= set(result)
    assert result["num_images"] == 16 and len(result["kl_per_dim"]) == 2
    assert sum(result["kl_per_dim"]) == pytest.approx(result["kl"], rel=1e-5)
    assert result["elbo_gap_nats"] == pytest.approx(-result["iw_nll_nats"] - result["elbo_nats"])
    assert result["psnr"] == pytest.approx(-10 * math.log10(result["mse_per_pixel"]), abs=3)
    assert 0 <= result["active_units"] <= 2
    assert (made["vae"] / "eval" / "val.json").is_file()


def test_decoder_only_has_no_encoder_metrics(runs):
    made, splits = runs
    model = vaelab.load(made["decoder_only"])
    result = evaluate_model(model, splits.val, iw_samples=10, progress=False)
    for key in ["kl", "elbo_gap_nats", "kl_per_dim", "active_units", "mse_per_pixel", "psnr"]:
        assert key not in result
    assert result["iw_nll_nats"] > 0
    with pytest.raises(ValueError, match="has no encoder"):
        posterior_means(model, splits.val)


def test_posterior_means(runs):
    made, splits = runs
    model = vaelab.load(made["vae"])
    means = posterior_means(model, splits.val, batch_size=5)
    assert means.shape == (16, 2) and means.dtype == np.float32
    expected = model.encode(splits.val.batch(slice(0, 16))).mu.detach().numpy()
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-6)


def test_evaluate_reports_disentanglement_on_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr("vaelab.evaluate.FACTOR_POINTS", 10)  # a smoke-sized classifier budget
    cfg = vaelab.load_config(
        overrides=["data.name=shapes", "data.subset=400", "data.val_fraction=0.25",
                   "model.widths=[4,8,8,8]", "model.latent_dim=3", "train.epochs=1",
                   "train.batch_size=100", "train.progress=false"]
    )  # fmt: skip
    run = vaelab.train(cfg, tmp_path / "run")
    result = evaluate(run, "val", iw_samples=2, progress=False)
    for key in ["mig", "beta_vae_score", "factor_vae_score", "dci_disentanglement",
                "dci_completeness", "dci_informativeness"]:  # fmt: skip
        assert 0.0 <= result[key] <= 1.0, key
    assert set(result["mig_per_factor"]) == {"shape", "scale", "orientation", "pos_x", "pos_y"}
    assert json.loads((run / "eval" / "val.json").read_text())["mig"] == result["mig"]


def test_ais_through_a_model_recovers_the_exact_likelihood():
    """vaelab.ais on a vaelab model (decode_logits and the likelihood object), all chains and
    images in one tensor: within 0.1 nats of the closed form, and no further than IS with K =
    1000 from it."""
    torch.manual_seed(0)
    w = torch.tensor([[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.5, 0.4], [0.9, 1.0], [1.2, 1.0]])
    model = LinearGaussianVAE(w.double(), torch.linspace(-0.5, 0.5, K_DIMS).double(), 0.5)
    model = model.double().eval()
    z = torch.randn(4, D, dtype=torch.float64)
    x = z @ model.w.T + model.b + 0.5**0.5 * torch.randn(4, K_DIMS, dtype=torch.float64)
    x = x.view(4, 1, 1, K_DIMS)
    chains = 32
    log_lik = ais.model_log_likelihood(model, x, chains)
    result = ais.ais(log_lik, torch.randn(chains, 4, D, dtype=torch.float64), 500)
    exact = model.exact_log_px(x)
    assert (result.log_px() - exact).abs().max() < 0.1


def test_evaluate_adds_ais_on_the_first_images(runs):
    made, splits = runs
    for name in ["vae", "decoder_only"]:
        result = evaluate(made[name], "val", iw_samples=5, progress=False, splits=splits,
                          ais_steps=3, ais_chains=2, images=8)  # fmt: skip
        assert result["num_images"] == 8
        assert result["ais_steps"] == 3 and result["ais_chains"] == 2
        assert 0 <= result["ais_accept_rate"] <= 1
        assert result["ais_bpd"] == pytest.approx(
            vaelab.load(made[name]).bits_per_dim(-result["ais_nll_nats"])
        )
    saved = json.loads((made["vae"] / "eval" / "val.json").read_text())
    assert saved["num_images"] == 8 and "ais_nll_nats" in saved
    plain = evaluate(made["vae"], "val", iw_samples=5, progress=False, splits=splits)
    assert "ais_nll_nats" not in plain and plain["num_images"] == 16
    for bad, flag in [({"ais_steps": -1}, "--ais-steps"), ({"ais_chains": 0}, "--ais-chains"),
                      ({"images": 0}, "--images")]:  # fmt: skip
        with pytest.raises(ConfigError, match=flag):
            evaluate(made["vae"], "val", iw_samples=5, progress=False, splits=splits, **bad)


def test_bdmc_on_simulated_data_brackets_the_exact_likelihood():
    """Forward AIS bounds log p(x) from below and reverse AIS, started at the z that made each
    simulated x, from above; here log p(x) is known, and more steps tighten the sandwich."""
    torch.manual_seed(0)
    w = torch.tensor([[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.5, 0.4], [0.9, 1.0], [1.2, 1.0]])
    model = LinearGaussianVAE(w.double(), torch.linspace(-0.5, 0.5, K_DIMS).double(), 0.5)
    model = model.double().eval()
    gaps = []
    for steps in (10, 200):
        x, lower, upper = simulated_bdmc(model, 8, steps, chains=64)
        exact = model.exact_log_px(x)
        assert x.shape == (8, 1, 1, K_DIMS)
        assert lower.mean() < exact.mean() < upper.mean()
        gaps.append((upper - lower).mean())
    assert gaps[1] < gaps[0] and gaps[1] < 0.5


def test_evaluate_reports_bdmc(runs):
    made, splits = runs
    result = evaluate(made["vae"], "val", iw_samples=5, progress=False, splits=splits,
                      ais_steps=3, ais_chains=2, images=4, bdmc=3)  # fmt: skip
    assert result["bdmc_images"] == 3 and result["bdmc_steps"] == 3
    assert result["bdmc_gap_nats"] == pytest.approx(
        result["bdmc_upper_nats"] - result["bdmc_lower_nats"]
    )
    with pytest.raises(ConfigError, match="--bdmc"):
        evaluate(made["vae"], "val", iw_samples=5, progress=False, splits=splits, bdmc=-2)


def test_evaluate_keeps_freed_memory_as_the_run_trained(runs, monkeypatch, tmp_path):
    """train.cpu_memory_cache of the run decides, as in training (the AIS and IS passes
    allocate large decoder outputs at every step)."""
    from vaelab import speed

    made, splits = runs
    calls = []
    monkeypatch.setattr(speed, "cache_cpu_memory", lambda: calls.append(1) or True)
    evaluate(made["vae"], "val", iw_samples=2, progress=False, splits=splits)
    assert calls == [1]
    off = vaelab.train(tiny_config("train.epochs=1", "train.cpu_memory_cache=false"),
                       tmp_path / "off", splits=splits)  # fmt: skip
    calls.clear()
    evaluate(off, "val", iw_samples=2, progress=False, splits=splits)
    assert calls == []


def test_the_optimised_posterior_is_the_best_diagonal_gaussian():
    """For probabilistic PCA the posterior is N(m, S); the diagonal Gaussian closest to it in
    KL(q || p(z|x)) has mean m and variances 1 / diag(S^-1), and ELBO(q*) = log p(x) -
    KL(q* || p(z|x)) in closed form. q* starts from a poor q and must get there."""
    from vaelab import gap

    torch.manual_seed(0)
    w = torch.tensor([[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.5, 0.4], [0.9, 1.0], [1.2, 1.0]])
    s2 = 0.5
    model = LinearGaussianVAE(w.double(), torch.linspace(-0.5, 0.5, K_DIMS).double(), s2)
    model = model.double().eval()
    x = (torch.randn(3, D, dtype=torch.float64) @ model.w.T + model.b).view(3, 1, 1, K_DIMS)
    precision = torch.eye(D, dtype=torch.float64) + model.w.T @ model.w / s2  # S^-1
    cov = torch.linalg.inv(precision)
    m = (x.flatten(1) - model.b) @ model.w @ cov / s2
    start = DiagonalGaussian(torch.zeros(3, D, dtype=torch.float64),
                             torch.zeros(3, D, dtype=torch.float64))  # fmt: skip
    q_star = gap.optimise_posterior(model, x, start, steps=2000, samples=64, lr=0.02)
    best_var = 1.0 / torch.diagonal(precision)
    torch.testing.assert_close(q_star.mu, m, atol=0.02, rtol=0)
    torch.testing.assert_close(q_star.logvar.exp(), best_var.expand(3, D), atol=0, rtol=0.05)
    # KL(N(m, diag v) || N(m, S)) = (tr(S^-1 diag v) - d + log det S - sum log v) / 2
    kl = 0.5 * ((torch.diagonal(precision) * best_var).sum() - D
                + torch.logdet(cov) - best_var.log().sum())  # fmt: skip
    torch.manual_seed(1)
    elbo_star = gap.elbo(model, x, q_star, samples=20000)
    torch.testing.assert_close(elbo_star, model.exact_log_px(x) - kl, atol=0.02, rtol=0)
    assert (elbo_star > gap.elbo(model, x, start, samples=20000)).all()
    assert all(p.grad is None for p in model.parameters())  # the model is not trained
