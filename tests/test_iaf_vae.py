"""iaf_vae: the inverse autoregressive flow posterior (Kingma et al. 2016).

The flow's log q of its own samples is checked against the change of variables computed here,
log N(eps) - log |det d z / d eps|, with the Jacobian of the map eps -> z by autograd in float64;
its inversion against its samples; the MADE's autoregressive structure against its Jacobian;
the Monte Carlo KL and the importance weights against the same draws; and a run trains, loads,
evaluates with IS and with AIS from the prior, and takes its gap apart."""

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Normal

import vaelab
from tests.conftest import tiny_config, tiny_splits
from vaelab import ais, gap
from vaelab.config import ConfigError
from vaelab.evaluate import evaluate, gap_decomposition, simulated_bdmc
from vaelab.models import build
from vaelab.models.iaf_vae import IAFVAE, MADE, IAFPosterior

SHAPE = (1, 8, 8)


def make(*overrides: str, seed: int = 0, scale: float = 1.0) -> IAFVAE:
    """A float64 iaf_vae in eval mode; the flow's weights multiplied by ``scale`` (a flow far
    from the identity, so its log-determinant matters)."""
    torch.manual_seed(seed)
    model = build(tiny_config("model.name=iaf_vae", *overrides).model, SHAPE).double().eval()
    with torch.no_grad():
        for p in model.flow.parameters():
            p.mul_(scale)
    return model


def log_q_by_jacobian(q: IAFPosterior, eps: torch.Tensor) -> torch.Tensor:
    """log q(z) at z = flow(mu + sigma eps) for eps (B, d), image by image: log N(eps; 0, I) -
    log |det dz/deps| with the Jacobian by autograd (B,)."""
    out = []
    for i in range(eps.shape[0]):
        one = IAFPosterior(q.mu[i : i + 1], q.logvar[i : i + 1], q.h[i : i + 1], q.flow)

        def z_of(e, one=one):
            return one.push(one.mu + one.std * e.unsqueeze(0))[0][0]

        jac = jacobian(z_of, eps[i])  # (d, d)
        log_n = Normal(0.0, 1.0).log_prob(eps[i]).sum()
        out.append(log_n - torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@pytest.mark.parametrize("d, steps", [(2, 1), (3, 2), (3, 3)])
def test_log_q_of_the_samples_is_the_change_of_variables(d, steps):
    model = make(f"model.latent_dim={d}", f"model.flow_steps={steps}", scale=3.0)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        q = model.encode(x)
        torch.manual_seed(1)
        z, log_q = q.rsample_with_log_prob(1)
        torch.manual_seed(1)
        eps = torch.randn(1, 4, d, dtype=torch.float64)
        z_again, _ = q.push(q.mu + q.std * eps)
    assert torch.equal(z, z_again)  # the base noise is batch_randn's, as DiagonalGaussian's
    want = log_q_by_jacobian(q, eps[0])
    torch.testing.assert_close(log_q[0], want, rtol=0, atol=1e-10)
    with torch.no_grad():
        inverted = q.log_prob(z)  # by inverting the flow, d MADE passes a step
    torch.testing.assert_close(inverted, log_q, rtol=0, atol=1e-10)
    # the flow is not the base Gaussian: the log-determinant is far from zero
    base = Normal(q.mu, q.std).log_prob(q.mu + q.std * eps).sum(-1)
    assert (log_q - base).abs().min() > 1e-3


def test_the_made_is_autoregressive_and_each_step_triangular():
    torch.manual_seed(0)
    d, hidden = 4, 16
    made = MADE(d, hidden).double()
    with torch.no_grad():
        for p in made.parameters():
            p.mul_(3.0)
    z, h = torch.randn(d, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    jm, js = jacobian(lambda v: made(v, h), z)  # (d, d) each
    for jac in (jm, js):
        assert (torch.triu(jac) == 0).all()  # output i depends on z[j], j < i, only
        below = torch.tril_indices(d, d, -1)
        assert (jac[below[0], below[1]].abs() > 0).all()  # and on each of them
    # the context reaches every output, the first too
    hm, hs = jacobian(lambda c: made(z, c), h)
    assert (hm.abs().sum(1) > 0).all() and (hs.abs().sum(1) > 0).all()
    model = make("model.latent_dim=3", "model.flow_steps=2", scale=3.0)
    with torch.no_grad():
        q = model.encode(torch.rand(1, *SHAPE, dtype=torch.float64))
    z0 = torch.randn(1, 3, dtype=torch.float64)
    for t, triangle in ((0, torch.tril), (1, torch.triu)):  # the order reverses between steps
        jac = jacobian(lambda v, t=t: q.step(t, v.view(1, 3))[0][0], z0[0])  # (d, d)
        torch.testing.assert_close(jac, triangle(jac), rtol=0, atol=0)
        off = torch.tril_indices(3, 3, -1) if t == 0 else torch.triu_indices(3, 3, 1)
        assert (jac[off[0], off[1]].abs() > 0).all()
        # its diagonal is sigma_t, whose log the step returns
        log_sigma = q.step(t, z0)[1]
        torch.testing.assert_close(jac.diagonal().log().sum(), log_sigma[0], rtol=0, atol=1e-12)


def test_the_kl_is_the_monte_carlo_mean_of_log_q_minus_log_p_on_the_draws():
    model = make("model.latent_dim=3", "model.mc_samples=3", scale=2.0)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)  # as tests.conftest.posterior_draw, with the flow's log q
    q = model.encode(x)
    z, _ = q.rsample_with_log_prob(3)
    z = z.detach()
    with torch.no_grad():
        log_q = q.log_prob(z)  # by inversion, not the forward pass's log-determinants
    log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(
        out.terms["kl"].detach(), (log_q - log_p).mean(0), rtol=0, atol=1e-10
    )
    nll = model.likelihood.nll(x, model.decode_logits(z)).mean(0)
    torch.testing.assert_close(out.elbo.detach(), -(nll + out.terms["kl"]).detach())
    torch.testing.assert_close(out.loss, out.terms["recon"] + out.terms["kl"])
    # the closed form of the base Gaussian is not what the loss uses
    assert (out.terms["kl"] - q.kl_per_dim().sum(-1)).abs().min() > 1e-3
    with pytest.raises(NotImplementedError, match="no closed form"):
        q.kl()


def test_importance_weights_use_log_q_of_the_flows_own_samples():
    model = make(scale=2.0)
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        q = model.encode(x)
        torch.manual_seed(2)
        log_w = model.log_weights(x, 6, q)
        torch.manual_seed(2)
        z = q.rsample(6)
        torch.manual_seed(2)
        eps = torch.randn(6, 3, 2, dtype=torch.float64)  # the base noise of those samples
        log_q = torch.stack([log_q_by_jacobian(q, e) for e in eps])  # (6, 3)
        nll = model.likelihood.nll(x, model.decode_logits(z))
    want = -nll + Normal(0.0, 1.0).log_prob(z).sum(-1) - log_q
    torch.testing.assert_close(log_w, want, rtol=0, atol=1e-9)


def test_the_mode_is_the_base_mean_through_the_flow_and_encode_gives_it():
    model = make(scale=2.0)
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        q = model.encode(x)
        zero = q.push(q.mu.unsqueeze(0))[0][0]
    torch.testing.assert_close(q.mode(), zero)
    assert (q.mode() - q.mu).abs().max() > 1e-3
    assert q.mu.shape == q.logvar.shape == (3, 2) and q.h.shape == (3, 64)


def test_settings_it_cannot_honour_are_refused_and_ais_starts_from_the_prior():
    with pytest.raises(ConfigError, match="'model.free_bits'.*iaf_vae"):
        tiny_config("model.name=iaf_vae", "model.free_bits=0.5")
    with pytest.raises(ConfigError, match="'model.flow_steps'"):
        tiny_config("model.name=iaf_vae", "model.flow_steps=0")
    model = make()
    assert ais.start(model) == "prior" and ais.start(make_vae()) == "q"
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(TypeError, match="diagonal Gaussian"):
        ais.model_ais(model, x, 2, 1, q=model.encode(x))


def make_vae():
    torch.manual_seed(0)
    return build(tiny_config("model.name=vae").model, SHAPE)


def test_q_star_optimises_the_base_gaussian_under_the_fixed_flow():
    model = make(scale=2.0)
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        q = model.encode(x)
        torch.manual_seed(8)
        got = gap.elbo(model, x, q, 20)
        torch.manual_seed(8)
        z, log_q = q.rsample_with_log_prob(20)
        nll = model.likelihood.nll(x, model.decode_logits(z))
    want = (-nll + Normal(0.0, 1.0).log_prob(z).sum(-1) - log_q).mean(0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    same = gap.compare_elbos(model, x, q, q, 50)  # q* = q: the same draws, the same ELBO
    assert torch.equal(same.elbo_q, same.elbo_q_star)
    q_star = gap.optimise_posterior(model, x, q, steps=30, samples=8, lr=0.05)
    assert isinstance(q_star, IAFPosterior) and q_star.flow is q.flow and q_star.h is q.h
    assert all(p.grad is None for p in model.parameters())  # the model is not trained by q*
    est = gap.compare_elbos(model, x, q, q_star, 400)
    assert (est.elbo_q_star - est.elbo_q).mean() > 0


# -- a run: train, load, evaluate with IS and AIS from the prior, the gap, BDMC ----------------


def test_an_iaf_run_trains_loads_and_evaluates_with_is_and_ais_from_the_prior(tmp_path):
    splits = tiny_splits(n_train=32, n_val=8)
    cfg = tiny_config("model.name=iaf_vae", "model.flow_hidden=8", "train.epochs=1")
    run = vaelab.train(cfg, tmp_path / "iaf", splits=splits)
    model = vaelab.load(run)
    assert type(model) is IAFVAE
    result = evaluate(run, "val", iw_samples=64, progress=False, splits=splits, ais_steps=3,
                      ais_chains=2)  # fmt: skip
    for key in ("elbo_nats", "kl", "iw_nll_nats", "ais_nll_nats", "elbo_gap_nats"):
        assert math.isfinite(result[key]), key
    assert result["ais_start"] == "prior"
    assert result["iw_nll_nats"] <= -result["elbo_nats"] + 0.5, result
    assert "kl_per_dim" not in result  # the flow's KL has no per-dimension form
    assert result["active_units"] >= 0
    found = gap_decomposition(run, "val", images=4, progress=False, splits=splits, ais_steps=3,
                              ais_chains=2, iw_samples=16, q_star_steps=5)  # fmt: skip
    for key in ("log_px_ais", "iw_bound", "elbo_q_star", "elbo_q", "amortization_gap"):
        assert math.isfinite(found[key]), key
    assert found["settings"]["ais_start"] == "prior"
    x, lower, upper = simulated_bdmc(model, 3, steps=3, chains=2)
    assert x.shape == (3, *SHAPE) and torch.isfinite(lower).all() and torch.isfinite(upper).all()
    assert np.isfinite(model.reconstruct(x).numpy()).all()
