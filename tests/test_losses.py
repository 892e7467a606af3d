import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vaelab import losses

torch.manual_seed(0)


def test_bernoulli_nll_matches_torch_distributions():
    x = (torch.rand(6, 1, 5, 5) > 0.5).float()
    logits = torch.randn(6, 1, 5, 5) * 3
    expected = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(losses.bernoulli_nll(x, logits), expected)


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(7, 5), torch.randn(7, 5)
    q = Normal(mu, torch.exp(0.5 * logvar))
    expected = kl_divergence(q, Normal(torch.zeros(5), torch.ones(5))).sum(-1)
    torch.testing.assert_close(losses.gaussian_kl(mu, logvar), expected)
    assert torch.all(losses.gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)) == 0)


def test_log_probs_match_torch_distributions():
    z, mu, logvar = torch.randn(3, 7, 5), torch.randn(7, 5), torch.randn(7, 5)
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(losses.gaussian_log_prob(z, mu, logvar), expected)
    torch.testing.assert_close(
        losses.standard_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1)
    )


def test_iw_bound_is_log_mean_exp_and_equals_single_sample_for_k1():
    log_w = torch.randn(10, 4) * 5
    expected = torch.log(torch.exp(log_w.double()).mean(0)).float()
    torch.testing.assert_close(losses.iw_bound(log_w), expected)
    torch.testing.assert_close(losses.iw_bound(log_w[:1]), log_w[0])
    # Stable where exp overflows.
    assert torch.isfinite(losses.iw_bound(torch.full((3, 2), 1000.0))).all()


def test_bits_per_dim():
    # A uniform density on [0, 1]^K (log p = 0) puts 1/255 on each of the 255 bins of width
    # 1/255 around the pixel values k/255 (a bin sticks out at each end): log2(255) bits.
    assert losses.bits_per_dim(0.0, 784) == pytest.approx(math.log2(255))
    assert losses.bits_per_dim(-784 * math.log(2), 784) == pytest.approx(1 + math.log2(255))
