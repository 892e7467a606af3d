"""The prior as an object (vaelab.models.priors) and vamp_vae (Tomczak & Welling 2018).

Densities are checked against computations written here: an explicit loop over the mixture's
components with torch.distributions.Normal in float64, the exact log p(x) of a linear-Gaussian
model under a Gaussian-mixture prior, and the standard normal's path against the formulas it
had before priors were objects (bit for bit)."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

import vaelab
from tests.conftest import posterior_draw, tiny_config, tiny_splits
from vaelab import ais, gap, losses, samplers
from vaelab.ais import prior_energy
from vaelab.config import ConfigError
from vaelab.evaluate import evaluate, posterior_means, simulated_bdmc
from vaelab.models import MODELS, build, priors
from vaelab.models.vamp_vae import VampVAE

SHAPE = (1, 8, 8)


def make(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build(tiny_config("model.name=vamp_vae", *overrides).model, SHAPE)


def components(model) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_k, sigma_k (K, d) of the VampPrior, computed here: the pseudo-inputs clamped to [0, 1]
    through the encoder with its batch norms on running statistics (a copy in eval mode)."""
    was = model.training
    model.eval()
    try:
        u = model.prior.pseudo_inputs.detach().clamp(0.0, 1.0)
        mu, logvar = model.encoder(u).detach().double().chunk(2, dim=-1)
    finally:
        model.train(was)
    return mu, torch.exp(0.5 * logvar)


def explicit_log_prior(model, z: torch.Tensor) -> np.ndarray:
    """log 1/K sum_k N(z; mu_k, diag sigma_k^2) by a loop over k in float64, logsumexp in
    numpy: z (..., d) -> (...)."""
    mu, sigma = components(model)
    per_k = [Normal(mu[k], sigma[k]).log_prob(z.double()).sum(-1).numpy() for k in range(len(mu))]
    stacked = np.stack(per_k)  # (K, ...)
    top = stacked.max(0)
    return top + np.log(np.exp(stacked - top).sum(0)) - math.log(len(mu))


# -- the prior object on every model ------------------------------------------------------------


# vq_vae's prior is the uniform one over its codes (it owns the codebook); cvae is built with the
# variables training would read from the data.
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"vamp_vae", "vq_vae"}))
def test_every_other_model_has_the_standard_normal_prior_and_no_new_weights(name):
    torch.manual_seed(0)
    extra = ["model.conditions=[label:3]"] if name == "cvae" else []
    model = build(tiny_config(f"model.name={name}", *extra).model, SHAPE)
    assert type(model.prior) is priors.StandardNormal
    assert not any(k.startswith("prior.") for k in model.state_dict())
    z = torch.randn(5, 3, 2)
    assert torch.equal(model.prior.log_prob(z), losses.standard_normal_log_prob(z))


def test_the_vae_with_the_standard_normal_prior_computes_what_it_did_bit_for_bit():
    """forward, the importance weights and sampling against the closed forms of losses, on
    the same draws: equal, not close."""
    torch.manual_seed(0)
    model = build(tiny_config("model.name=vae", "model.mc_samples=3").model, SHAPE).eval()
    x = torch.rand(4, *SHAPE)
    torch.manual_seed(1)
    out = model(x)
    q, z = posterior_draw(model, x, seed=1, k=3)
    nll = model.likelihood.nll(x, model.decode_logits(z))
    kl = losses.gaussian_kl(q.mu, q.logvar)
    assert torch.equal(out.terms["kl"], kl)
    assert torch.equal(out.elbo, -(nll.mean(0) + kl))
    assert torch.equal(out.loss, out.terms["recon"] + kl)
    torch.manual_seed(2)
    log_w = model.log_weights(x, 5)
    q, z = posterior_draw(model, x, seed=2, k=5)
    nll = model.likelihood.nll(x, model.decode_logits(z))
    assert torch.equal(log_w, -nll + losses.standard_normal_log_prob(z) - q.log_prob(z))
    torch.manual_seed(3)
    drawn = model.sample(6, temperature=0.5)
    torch.manual_seed(3)
    assert torch.equal(drawn, model.decode(0.5 * torch.randn(6, 2)))


# -- the VampPrior's density, sampling and KL -------------------------------------------------


def test_the_vamp_prior_density_matches_an_explicit_loop_over_components():
    model = make("model.pseudo_inputs=7").double()
    with torch.no_grad():  # spread the pseudo-inputs (some outside [0, 1]: clamped)
        model.prior.pseudo_inputs.copy_(torch.rand(7, *SHAPE, dtype=torch.float64) * 1.4 - 0.2)
    z = torch.randn(3, 5, 2, dtype=torch.float64) * 2
    z[0, 0] = 40.0  # far from every component: logsumexp must not underflow to -inf
    got = model.prior.log_prob(z).detach().numpy()
    want = explicit_log_prior(model, z)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-10)
    # fixed(): the same density with the components held
    np.testing.assert_allclose(model.prior.fixed().log_prob(z).numpy(), want, rtol=1e-12)


def test_the_mixture_density_is_the_same_in_chunks(monkeypatch):
    mu, logvar = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    z = torch.randn(5, 11, 3, dtype=torch.float64)
    whole = priors.mixture_log_prob(z, mu, logvar)
    monkeypatch.setattr(priors, "MIXTURE_ELEMENTS", 50)  # 2 rows per chunk
    assert torch.equal(priors.mixture_log_prob(z, mu, logvar), whole)


def test_the_vamp_prior_in_float32_agrees_with_float64():
    model = make("model.pseudo_inputs=20")
    z = torch.randn(100, 2) * 3
    got = model.prior.log_prob(z).detach().double().numpy()
    np.testing.assert_allclose(got, explicit_log_prior(model, z), rtol=1e-5, atol=1e-4)


def test_one_pseudo_input_makes_the_prior_a_gaussian():
    """K = 1: log p(z) is the log density of N(mu_1, sigma_1^2), and the importance weights
    are log p(x|z) + log N(z; mu_1, sigma_1) - log q(z|x) on the same draws."""
    model = make("model.pseudo_inputs=1", "model.net=mlp").double().eval()
    mu, sigma = components(model)
    z = torch.randn(10, 2, dtype=torch.float64)
    gauss = Normal(mu[0], sigma[0]).log_prob(z).sum(-1)
    torch.testing.assert_close(model.prior.log_prob(z).detach(), gauss, rtol=1e-12, atol=1e-12)
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(4)
        log_w = model.log_weights(x, 6)
        q, z = posterior_draw(model, x, seed=4, k=6)
        nll = model.likelihood.nll(x, model.decode_logits(z))
        log_q = Normal(q.mu, q.std).log_prob(z).sum(-1)
        want = -nll + Normal(mu[0], sigma[0]).log_prob(z).sum(-1) - log_q
    torch.testing.assert_close(log_w, want, rtol=1e-12, atol=1e-10)


def test_the_kl_is_the_monte_carlo_mean_of_log_q_minus_log_p_on_the_draws():
    model = make("model.mc_samples=3", "model.pseudo_inputs=5").double().eval()
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    torch.manual_seed(5)
    out = model(x)
    q, z = posterior_draw(model, x, seed=5, k=3)
    log_q = Normal(q.mu, q.std).log_prob(z).sum(-1).detach().numpy()  # (3, 4)
    kl = (log_q - explicit_log_prior(model, z.detach())).mean(0)
    np.testing.assert_allclose(out.terms["kl"].detach().numpy(), kl, rtol=1e-10, atol=1e-10)
    nll = model.likelihood.nll(x, model.decode_logits(z)).mean(0)
    torch.testing.assert_close(out.elbo, -(nll + out.terms["kl"]))
    torch.testing.assert_close(out.loss, out.terms["recon"] + out.terms["kl"])
    assert out.loss.shape == out.elbo.shape == (4,)


def test_sampling_draws_a_component_uniformly_then_its_gaussian():
    """Two pseudo-inputs whose posteriors sit far apart: half the draws near each mean, with
    that component's spread (60,000 draws)."""
    model = make("model.pseudo_inputs=2", "model.net=mlp").eval()
    prior = priors.GaussianMixture(torch.tensor([[-20.0, 0.0], [20.0, 5.0]]),
                                   torch.log(torch.tensor([[1.0, 4.0], [0.25, 1.0]])))  # fmt: skip
    torch.manual_seed(6)
    z = prior.sample(60_000)
    left = z[:, 0] < 0
    assert abs(left.double().mean().item() - 0.5) < 0.01
    torch.testing.assert_close(z[left].mean(0), torch.tensor([-20.0, 0.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(z[left].std(0), torch.tensor([1.0, 2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(z[~left].std(0), torch.tensor([0.5, 1.0]), atol=0.02, rtol=0)
    images = model.sample(5)
    assert images.shape == (5, *SHAPE) and images.min() >= 0 and images.max() <= 1
    assert model.prior.sample((2, 3)).shape == (2, 3, 2)


# -- batch norm: the prior does not depend on the batch -------------------------------------


def test_the_pseudo_inputs_use_and_leave_the_running_statistics():
    model = make("model.net=conv").train()
    x = torch.rand(8, *SHAPE)
    model(x)  # one training pass: the running statistics move off their start
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    before = [m.running_mean.clone() for m in norms]
    z = torch.randn(6, 2)
    in_training = model.prior.log_prob(z).detach()
    assert all(m.training for m in norms)  # back in training mode
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms, strict=True))
    model.eval()
    torch.testing.assert_close(in_training, model.prior.log_prob(z).detach())


# -- training, config, torchrun ---------------------------------------------------------------


def test_the_pseudo_inputs_train():
    model = make("model.mc_samples=2")
    start = model.prior.pseudo_inputs.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(8, *SHAPE)
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        out.loss.mean().backward()
        grad = model.prior.pseudo_inputs.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        opt.step()
    assert (model.prior.pseudo_inputs - start).abs().max() > 1e-3


def test_settings_it_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="'model.free_bits'.*vamp_vae"):
        tiny_config("model.name=vamp_vae", "model.free_bits=0.5")
    with pytest.raises(ConfigError, match="'model.pseudo_inputs'"):
        tiny_config("model.name=vamp_vae", "model.pseudo_inputs=0")
    cfg = tiny_config("model.name=vamp_vae", "train.kl_warmup_steps=10")
    VampVAE.check_run(cfg, world_size=2)  # the prior does not depend on the batch


# -- AIS and the gap with a learned prior -------------------------------------------------------


def test_ais_from_a_mixture_prior_matches_the_exact_log_likelihood():
    """x | z ~ N(W z + b, s2 I) under a 3-component Gaussian mixture prior: p(x) is the mixture
    of N(W mu_k + b, W S_k W^T + s2 I). AIS from the prior (exact draws, its energy by
    autograd) recovers it within 4 standard errors per image (the posterior is multimodal, so
    the chains' weights stay uneven: standard errors 0.12-0.16 nats with 100 chains); the
    standard normal's energy in its place misses by nats."""
    g = torch.Generator().manual_seed(0)
    dims, d, s2 = 5, 2, 0.3
    w = torch.randn(dims, d, generator=g, dtype=torch.float64)
    b = torch.randn(dims, generator=g, dtype=torch.float64)
    mu = torch.tensor([[-2.0, 1.0], [2.0, 0.5], [0.0, -2.5]], dtype=torch.float64)
    var = torch.tensor([[0.3, 0.5], [0.6, 0.2], [0.4, 0.4]], dtype=torch.float64)
    prior = priors.GaussianMixture(mu, var.log())
    images, chains = 4, 100
    torch.manual_seed(1)
    z = prior.sample(images)
    x = z @ w.T + b + math.sqrt(s2) * torch.randn(images, dims, dtype=torch.float64)
    exact = torch.logsumexp(torch.stack([
        MultivariateNormal(w @ mu[k] + b, w @ torch.diag(var[k]) @ w.T + s2 * torch.eye(dims))
        .log_prob(x) for k in range(3)
    ]), 0) - math.log(3)  # fmt: skip

    def log_lik(zz):
        mean = zz.view(chains, images, d) @ w.T + b
        sse = (x - mean).square().sum(-1)
        return (-0.5 * sse / s2 - 0.5 * dims * math.log(2 * math.pi * s2)).reshape(-1)

    torch.manual_seed(2)
    result = ais.ais(log_lik, prior.sample((chains, images)), 300, energy=prior_energy(prior))
    error, se = result.log_px() - exact, result.variance().sqrt()
    assert (error.abs() < 4 * se).all() and (se < 0.25).all()
    assert 0.4 < result.accept_rate < 0.9
    wrong = ais.ais(log_lik, prior.sample((chains, images)), 100)  # N(0, I)'s energy
    assert (wrong.log_px() - exact).mean() < -1.0


def test_ais_from_q_weighs_with_the_learned_prior():
    """One AIS step from q: each chain's weight is the importance weight log p(x|z) + log p(z)
    - log q(z|x) at its start z = mu + sigma u, log p(z) the VampPrior's (computed here)."""
    model = make("model.pseudo_inputs=4").double().eval()
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    q = model.encode(x)
    q = type(q)(q.mu.detach(), q.logvar.detach())
    torch.manual_seed(7)
    result = ais.model_ais(model, x, chains=5, steps=1, q=q)
    torch.manual_seed(7)
    z = q.mu + q.std * torch.randn(5, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        nll = model.likelihood.nll(x, model.decode_logits(z)).numpy()
    log_q = Normal(q.mu, q.std).log_prob(z).sum(-1).numpy()
    want = -nll + explicit_log_prior(model, z) - log_q
    np.testing.assert_allclose(result.log_weights.numpy(), want, rtol=1e-10, atol=1e-9)


def test_the_gap_elbos_use_the_monte_carlo_form_with_the_learned_prior():
    model = make("model.pseudo_inputs=4").double().eval()
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        q = model.encode(x)
        torch.manual_seed(8)
        got = gap.elbo(model, x, q, 20)
        torch.manual_seed(8)
        z = q.rsample(20)
        nll = model.likelihood.nll(x, model.decode_logits(z)).numpy()
    log_q = Normal(q.mu, q.std).log_prob(z).sum(-1).numpy()
    want = (-nll + explicit_log_prior(model, z) - log_q).mean(0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-9)
    same = gap.compare_elbos(model, x, q, q, 50)  # q* = q: the same draws, the same ELBO
    assert torch.equal(same.elbo_q, same.elbo_q_star)
    assert (same.difference_var == 0).all() and (same.elbo_q_var > 0).all()
    q_star = gap.optimise_posterior(model, x, q, steps=5, samples=4)
    assert torch.isfinite(q_star.mu).all()
    assert model.prior.pseudo_inputs.grad is None  # the model is not trained by q*


# -- a run: train, load, evaluate with IS and AIS, BDMC -----------------------------------------


def test_a_vamp_run_trains_loads_and_evaluates_with_is_and_ais(tmp_path):
    splits = tiny_splits(n_train=32, n_val=8)
    cfg = tiny_config("model.name=vamp_vae", "model.pseudo_inputs=6", "train.epochs=1")
    run = vaelab.train(cfg, tmp_path / "vamp", splits=splits)
    model = vaelab.load(run)
    assert type(model) is VampVAE
    result = evaluate(run, "val", iw_samples=8, progress=False, splits=splits, ais_steps=3,
                      ais_chains=2)  # fmt: skip
    for key in ("elbo_nats", "kl", "iw_nll_nats", "ais_nll_nats", "elbo_gap_nats"):
        assert math.isfinite(result[key]), key
    assert "kl_per_dim" not in result  # no closed form per dimension
    assert result["active_units"] >= 0
    x, lower, upper = simulated_bdmc(model, 3, steps=3, chains=2)
    assert x.shape == (3, *SHAPE) and torch.isfinite(lower).all() and torch.isfinite(upper).all()
    # The post-hoc sampler's fit is measured against the model's own (learned) prior.
    mixture = samplers.gmm(run, model, splits.train, splits.val, components=2)
    codes = torch.from_numpy(posterior_means(model, splits.val)).double()
    with torch.no_grad():
        learned = float(model.prior.log_prob(codes.float()).double().mean())
    standard = float((-0.5 * codes**2 - 0.5 * math.log(2 * math.pi)).sum(1).mean())
    assert mixture.info["val_log_density_prior"] == pytest.approx(learned, abs=1e-5)
    assert abs(learned - standard) > 0.01  # not N(0, I)'s
    # One saved before the prior was recorded was measured against N(0, I): fitted again.
    older = {k: v for k, v in mixture.info.items() if k != "prior"}
    samplers.LatentMixture(mixture.weights, mixture.means, mixture.chol, older).save(
        samplers.path(run, 2)
    )
    assert samplers.saved_gmm(run, model, 2) is None
    again = samplers.gmm(run, model, splits.train, splits.val, components=2)
    assert again.info["prior"] == "VampPrior"
    assert again.info["val_log_density_prior"] == pytest.approx(learned, abs=1e-5)


def test_two_processes_train_what_one_does(tmp_path):
    """The prior does not depend on the batch (batch norms on running statistics), so torchrun
    with 2 processes trains the weights one does, pseudo-inputs included (shapes: 459 train /
    51 val images, batch 64, one epoch, fp64)."""
    from tests.test_distributed import ARGS, _max_diff, _train, _weights

    args = [*ARGS, "data.name=shapes", "data.subset=510", "train.batch_size=64", "train.epochs=1",
            "model.name=vamp_vae", "model.pseudo_inputs=8"]  # fmt: skip
    _train(1, "--out", str(tmp_path / "one"), *args)
    _train(2, "--out", str(tmp_path / "two"), *args)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert _max_diff(one, two) < 1e-4
    assert (one["prior.pseudo_inputs"] - two["prior.pseudo_inputs"]).abs().max() < 1e-6
