"""The decoder likelihoods against independent definitions, and bits per dimension against the
exact probabilities of 8-bit pixels."""

import math

import pytest
import torch
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Normal

from vaelab import losses
from vaelab.models import likelihoods


@pytest.mark.parametrize("sigma2", [0.5, 0.1, 2.0])
def test_fixed_gaussian_matches_torch_distributions(sigma2):
    torch.manual_seed(0)
    x, logits = torch.rand(5, 3, 4, 4), torch.randn(2, 5, 3, 4, 4)
    lik = likelihoods.FixedGaussian(sigma2)
    recon, nll = lik.terms(x, logits)
    mean = torch.sigmoid(logits)
    expected = -Normal(mean, math.sqrt(sigma2)).log_prob(x).flatten(2).sum(2)  # (2, 5)
    torch.testing.assert_close(nll, expected)
    torch.testing.assert_close(recon, ((x - mean) ** 2).flatten(2).sum(2) / (2 * sigma2))
    torch.testing.assert_close(lik.nll(x, logits), nll)
    torch.testing.assert_close(lik.mean(logits), mean)


def test_fixed_gaussian_at_half_is_the_squared_error_plus_a_constant():
    x, logits = torch.rand(4, 1, 6, 6), torch.randn(1, 4, 1, 6, 6)
    recon, nll = likelihoods.FixedGaussian(0.5).terms(x, logits)
    sse = ((x - torch.sigmoid(logits)) ** 2).flatten(2).sum(2)
    torch.testing.assert_close(recon, sse)
    torch.testing.assert_close(nll, sse + 0.5 * 36 * math.log(math.pi))


def test_bernoulli_matches_torch_distributions():
    x = (torch.rand(6, 1, 5, 5) > 0.5).float()
    logits = torch.randn(1, 6, 1, 5, 5) * 3
    recon, nll = likelihoods.Bernoulli().terms(x, logits)
    expected = -TorchBernoulli(logits=logits).log_prob(x).flatten(2).sum(2)
    torch.testing.assert_close(nll, expected)
    torch.testing.assert_close(recon, nll)


def test_samples_follow_the_likelihood():
    torch.manual_seed(0)
    logits = torch.full((20000,), 0.4)
    mean = torch.sigmoid(logits)
    draws = likelihoods.FixedGaussian(0.09).sample(logits)
    assert draws.mean().item() == pytest.approx(mean[0].item(), abs=0.01)
    assert draws.std().item() == pytest.approx(0.3, abs=0.01)
    coins = likelihoods.Bernoulli().sample(logits)
    assert set(coins.unique().tolist()) == {0.0, 1.0}
    assert coins.mean().item() == pytest.approx(mean[0].item(), abs=0.01)


def test_bits_per_dim_agrees_with_the_exact_bin_masses_of_the_gaussian():
    """8-bit pixels k/255 stand for bins [k/255 - 1/510, k/255 + 1/510]. The exact probability
    of a bin under N(mean, 1/2) against the density times the bin width 1/255, which bits per
    dimension use: about 1e-3 nats per 28x28 image apart."""
    torch.manual_seed(0)
    k, sigma2 = 784, 0.5
    x = torch.randint(1, 255, (8, 1, 28, 28)).double() / 255  # inner bins
    logits = torch.randn(1, 8, 1, 28, 28).double()
    nll = likelihoods.FixedGaussian(sigma2).nll(x, logits)[0]  # (8,)
    normal = Normal(torch.sigmoid(logits[0]), math.sqrt(sigma2))
    half = 0.5 / 255
    mass = normal.cdf(x + half) - normal.cdf(x - half)
    exact_nats = -mass.log().flatten(1).sum(1)  # -log P(the 8-bit image), exactly
    approx_nats = nll + k * math.log(255)  # -log p(x) + K ln 255
    gap = (exact_nats - approx_nats).abs()
    assert gap.max().item() < 2e-3  # nats per image
    assert gap.max().item() > 1e-5  # the approximation is not exact: the test measures it
    # Bits per dimension are these nats over K ln 2.
    for i in range(8):
        bpd = likelihoods.FixedGaussian(sigma2).bits_per_dim(-nll[i].item(), k)
        assert bpd == pytest.approx(exact_nats[i].item() / (k * math.log(2)), abs=4e-6)
    # The old constant ln 256 would be off by K ln(256/255) = 3.07 nats per image.
    assert k * math.log(256 / 255) > 1000 * gap.max().item()


def test_a_learned_variance_is_logged_and_a_fixed_one_is_not():
    assert likelihoods.FixedGaussian(0.5).logged() == {}
    learned = likelihoods.LearnedGaussian(1e-6)
    assert set(learned.logged()) == {"sigma2"}
    assert pytest.approx(math.log(2 * math.pi)) == losses.LOG_2PI
