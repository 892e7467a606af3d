"""AIS and BDMC (vaelab.ais) on probabilistic PCA, whose log p(x) is known in closed form:
z ~ N(0, I_d), x | z ~ N(W z + b, s2 I_D), so p(x) = N(x; b, W W^T + s2 I) and the posterior
is N(S W^T (x - b) / s2, S) with S = (I + W^T W / s2)^-1."""

import math

import pytest
import torch

from vaelab import ais

D, d, S2 = 6, 2, 0.5


def ppca(images: int, seed: int = 0):
    """W, b, images simulated from the model with the z that made them, and the exact
    log p(x) of each image (computed here with torch.distributions, not with vaelab)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, d, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    z = torch.randn(images, d, generator=g, dtype=torch.float64)
    x = z @ w.T + b + math.sqrt(S2) * torch.randn(images, D, generator=g, dtype=torch.float64)
    cov = w @ w.T + S2 * torch.eye(D, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    return w, b, x, z, exact


def log_likelihood(w, b, x, chains):
    def log_lik(z):
        mean = z.view(chains, x.shape[0], d) @ w.T + b
        sse = (x - mean).square().sum(-1)
        return (-0.5 * sse / S2 - 0.5 * D * math.log(2 * math.pi * S2)).reshape(-1)

    return log_lik


def test_the_schedule_runs_from_0_to_1_densest_at_the_ends():
    betas = ais.sigmoid_schedule(100)
    assert betas[0] == 0 and betas[-1] == 1 and len(betas) == 101
    steps = betas.diff()
    assert (steps > 0).all() and steps[0] < steps[50] > steps[-1]
    with pytest.raises(ValueError, match="at least 1 step"):
        ais.sigmoid_schedule(0)


def test_hmc_leaves_the_posterior_where_it_is():
    """At beta = 1, exact posterior samples stay distributed as the posterior: the mean and
    covariance of 4,000 chains after 20 transitions match the closed form."""
    torch.manual_seed(0)
    w, b, x, _, _ = ppca(1)
    chains = 4000
    cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + w.T @ w / S2)
    mean = cov @ w.T @ (x[0] - b) / S2
    z = mean + torch.randn(chains, d, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    log_lik = log_likelihood(w, b, x, chains)
    state = ais._log_lik_and_grad(log_lik, z)
    eps = torch.full((chains,), 0.3, dtype=torch.float64)
    rates = []
    for _ in range(20):
        z, state, accept = ais._hmc(log_lik, z, 1.0, eps, state)
        rates.append(accept.double().mean().item())
    assert 0.3 < sum(rates) / len(rates) < 1.0  # it moved
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cov, atol=0.02, rtol=0.1)


@pytest.mark.slow
def test_ais_matches_the_exact_log_likelihood_and_bdmc_brackets_it():
    torch.manual_seed(0)
    images, chains = 4, 100
    w, b, x, z_true, exact = ppca(images)
    log_lik = log_likelihood(w, b, x, chains)
    forward = ais.ais(log_lik, torch.randn(chains, images, d, dtype=torch.float64), 1000)
    assert not forward.reverse
    # T = 1000: within 0.1 nats of the exact value, image by image
    assert (forward.log_px() - exact).abs().max() < 0.1
    assert 0.5 < forward.accept_rate < 0.85  # adapted towards 0.65
    # BDMC: forward chains from the prior bound log p(x) from below, reverse chains from the
    # exact posterior sample (the z that made each x) from above; the sandwich tightens with T
    start = z_true.expand(chains, images, d).clone()
    gaps = []
    for steps in (20, 200):
        lower = ais.ais(log_lik, torch.randn(chains, images, d, dtype=torch.float64), steps)
        upper = ais.ais(log_lik, start, steps, reverse=True)
        assert upper.reverse
        low, high = lower.bound(), upper.bound()
        assert low.mean() < exact.mean() < high.mean()
        assert (low < exact + 0.05).all() and (high > exact - 0.05).all()  # up to the noise
        gaps.append(high - low)
    assert (gaps[1] < gaps[0]).all() and (gaps[1] < 0.6).all()
