import contextlib
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.conftest import posterior_draw, tiny_config
from vaelab import losses
from vaelab.models import MODELS, build

SHAPE = (1, 8, 8)


# Settings a model needs on tiny_config's latent of 2 (vq_vae: L = 2 codes of one number).
# cvae: the variables training would read from the data, given here.
NEEDS = {
    "vq_vae": ["model.code_dim=1", "model.codebook_size=8"],
    "cvae": ["model.conditions=[label:3]"],
}


def given(model, n: int):
    """A conditional model's condition for n images (label i mod 3); nothing for the others."""
    if not model.conditions:
        return contextlib.nullcontext()
    return model.given((torch.arange(n) % 3)[:, None])


def make(name: str, *overrides: str):
    torch.manual_seed(0)
    cfg = tiny_config(f"model.name={name}", *NEEDS.get(name, []), *overrides)
    return build(cfg.model, SHAPE)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_every_model_trains_and_samples(name, net):
    deterministic = name == "vq_vae"  # one z_q per image: model.mc_samples is refused
    model = make(name, f"model.net={net}", *([] if deterministic else ["model.mc_samples=3"]))
    x = torch.rand(4, *SHAPE)
    with given(model, 4):
        out = model(x)
    for term in (out.loss, out.terms["recon"], out.elbo):
        assert term.shape == (4,)
        assert torch.isfinite(term).all()
    assert all(t.shape == (4,) for t in out.terms.values())
    out.loss.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with given(model, 5):
        samples = model.sample(5)
    assert samples.shape == (5, *SHAPE)
    assert samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_with_encoders_encode(name):
    model = make(name)
    x = torch.rand(3, *SHAPE)
    with given(model, 3):
        check_encoding(model, x)


def check_encoding(model, x):
    if model.has_encoder:
        q = model.encode(x)
        assert q.mu.shape == (3, 2)
        assert not model.continuous_latent or q.logvar.shape == (3, 2)
        assert model.reconstruct(x).shape == x.shape
    else:
        with pytest.raises(NotImplementedError, match="no encoder"):
            model.encode(x)


def test_vae_terms_are_the_elbo_with_constants():
    model = make("vae").eval()
    x = torch.rand(4, *SHAPE)
    torch.manual_seed(1)
    out = model(x)
    q, z = posterior_draw(model, x, seed=1)
    mean = model.decode(z[0])
    sse = ((x - mean) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(out.terms["recon"], sse)  # sigma2 = 1/2: recon is the squared error
    torch.testing.assert_close(out.terms["kl"], losses.gaussian_kl(q.mu, q.logvar))
    const = 0.5 * 64 * math.log(math.pi)
    torch.testing.assert_close(out.elbo, -(sse + const + out.terms["kl"]))
    torch.testing.assert_close(out.loss, out.terms["recon"] + out.terms["kl"])


@pytest.mark.parametrize("sigma2", [0.5, 0.05])
def test_vae_elbo_matches_torch_distributions_on_rgb(sigma2):
    shape = (3, 6, 5)
    torch.manual_seed(0)
    model = build(tiny_config(f"model.sigma2={sigma2}").model, shape).eval()
    x = torch.rand(4, *shape)
    torch.manual_seed(1)
    out = model(x)
    q, (z,) = posterior_draw(model, x, seed=1)
    p_x = Normal(model.decode(z), math.sqrt(sigma2))
    log_px = p_x.log_prob(x).flatten(1).sum(1)
    kl = kl_divergence(Normal(q.mu, q.std), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(out.elbo, log_px - kl)
    sse = ((x - model.decode(z)) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(out.terms["recon"], sse / (2 * sigma2))
    elbo = out.elbo.mean().item()
    k = 3 * 6 * 5
    assert model.bits_per_dim(elbo) == pytest.approx((-elbo / k + math.log(255)) / math.log(2))


def test_vae_averages_recon_over_mc_samples():
    model = make("vae", "model.mc_samples=4").eval()
    x = torch.rand(3, *SHAPE)
    torch.manual_seed(5)
    out = model(x)
    _, z = posterior_draw(model, x, seed=5, k=4)  # (4, B, d)
    sse = ((x - model.decode(z.flatten(0, 1)).view(4, 3, *SHAPE)) ** 2).flatten(2).sum(2)
    torch.testing.assert_close(out.terms["recon"], sse.mean(0))


def test_bernoulli_bits_per_dim_has_no_dequantisation_term():
    model = make("vae", "model.likelihood=bernoulli")
    assert model.bits_per_dim(-64 * math.log(2)) == pytest.approx(1.0)


def test_beta_weights_only_the_kl_in_the_loss():
    x = torch.rand(4, *SHAPE)
    vae, beta = make("vae"), make("beta_vae", "model.beta=3.5")
    beta.load_state_dict(vae.state_dict())
    torch.manual_seed(2)
    a = vae(x)
    torch.manual_seed(2)
    b = beta(x)
    torch.testing.assert_close(b.loss, a.terms["recon"] + 3.5 * a.terms["kl"])
    torch.testing.assert_close(b.elbo, a.elbo)  # the reported ELBO stays unweighted


def test_bernoulli_likelihood():
    model = make("vae", "model.likelihood=bernoulli")
    x = (torch.rand(4, *SHAPE) > 0.5).float()
    torch.manual_seed(3)
    out = model(x)
    _, (z,) = posterior_draw(model, x, seed=3)
    torch.testing.assert_close(out.terms["recon"], losses.bernoulli_nll(x, model.decode_logits(z)))


def test_decoder_only_objectives():
    x = torch.rand(4, *SHAPE)
    mse = make("decoder_only", "model.mc_samples=5")
    marginal = make("decoder_only", "model.mc_samples=5", "model.objective=marginal")
    marginal.load_state_dict(mse.state_dict())
    torch.manual_seed(4)
    a = mse(x)
    torch.manual_seed(4)
    z = torch.randn(5, 4, 2)
    means = mse.decode(z.flatten(0, 1)).view(5, 4, *SHAPE)
    sse = ((x - means) ** 2).flatten(2).sum(2)  # (m, B)
    torch.testing.assert_close(a.loss, sse.mean(0))  # 1/m * sum of squared errors
    nll = sse + 0.5 * 64 * math.log(math.pi)
    log_px = torch.logsumexp(-nll, 0) - math.log(5)
    torch.testing.assert_close(a.elbo, log_px)
    torch.manual_seed(4)
    b = marginal(x)
    torch.testing.assert_close(b.loss, -log_px)  # -log of the Monte-Carlo mean of p(x|z_i)
    assert "kl" not in a.terms
