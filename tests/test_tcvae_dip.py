"""beta-TCVAE and DIP-VAE-I/II, each objective against an independent computation written here:
the minibatch-weighted-sampling estimates by explicit loops in float64 with
torch.distributions.Normal, the DIP covariance with numpy."""

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import vaelab
from tests.conftest import posterior_draw, tiny_config
from vaelab.config import ConfigError
from vaelab.evaluate import evaluate
from vaelab.models import MODELS, build
from vaelab.models.base import StepContext
from vaelab.models.beta_tcvae import BetaTCVAE, kl_decomposition

SHAPE = (1, 8, 8)
NEW = ["beta_tcvae", "dip_vae_i", "dip_vae_ii"]


def make(*overrides: str):
    torch.manual_seed(0)
    return build(tiny_config(*overrides).model, SHAPE)


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def mws_by_loops(z, mu, logvar, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chen et al. (2018) eq. 3 written out: for each sample z_i (B, d) of q(z|x_i),
    log q(z_i) ~= log sum_j q(z_i|x_j) - log(N M), likewise per dimension; MI, TC, dimKL (B,)."""
    z, mu, std = z.double(), mu.double(), (0.5 * logvar.double()).exp()
    b, d = mu.shape
    log_nm = math.log(n * b)
    prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    mi, tc, dim_kl = np.zeros(b), np.zeros(b), np.zeros(b)
    for i in range(b):
        joint = [Normal(mu[j], std[j]).log_prob(z[i]).sum().item() for j in range(b)]
        log_qz = logsumexp(joint) - log_nm
        log_marginals = 0.0
        for k in range(d):
            per_dim = [Normal(mu[j, k], std[j, k]).log_prob(z[i, k]).item() for j in range(b)]
            log_marginals += logsumexp(per_dim) - log_nm
        log_qz_x = Normal(mu[i], std[i]).log_prob(z[i]).sum().item()
        log_pz = prior.log_prob(z[i]).sum().item()
        mi[i] = log_qz_x - log_qz
        tc[i] = log_qz - log_marginals
        dim_kl[i] = log_marginals - log_pz
    return mi, tc, dim_kl


# -- beta-TCVAE -----------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_tcvae_terms_and_loss_are_the_mws_estimates(dtype, tol):
    weights = ("model.alpha=0.5", "model.beta=3", "model.gamma=2")
    model = make("model.name=beta_tcvae", "model.latent_dim=3", "model.mc_samples=2", *weights)
    model = model.to(dtype).eval()
    x = torch.rand(6, *SHAPE, dtype=dtype)
    ctx = StepContext(dataset_size=100)
    torch.manual_seed(1)
    out = model(x, ctx)
    q, z = posterior_draw(model, x, seed=1, k=2)  # (2, B, d)
    loops = [mws_by_loops(z[s], q.mu, q.logvar, 100) for s in range(2)]
    for t, name in enumerate(["mi", "tc", "dim_kl"]):
        expected = np.mean([draw[t] for draw in loops], axis=0)  # the mean over the m draws
        np.testing.assert_allclose(
            out.terms[name].detach().double().numpy(), expected, rtol=0, atol=tol
        )
    recon = out.terms["recon"]
    penalty = 0.5 * out.terms["mi"] + 3 * out.terms["tc"] + 2 * out.terms["dim_kl"]
    torch.testing.assert_close(out.loss, recon + penalty)
    assert set(out.terms) == {"recon", "kl", "mi", "tc", "dim_kl"}
    assert all(t.shape == (6,) for t in out.terms.values())


def test_mws_estimates_on_posteriors_far_apart():
    """An untrained model's posteriors nearly coincide; here they are spread out and
    correlated across dimensions (a shared shift), where the three terms differ clearly."""
    gen = torch.Generator().manual_seed(7)
    shift = 2 * torch.randn(7, 1, generator=gen, dtype=torch.float64)
    mu = shift + 0.5 * torch.randn(7, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(7, 3, generator=gen, dtype=torch.float64) - 1
    z = mu + (0.5 * logvar).exp() * torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    got = kl_decomposition(z, mu, logvar, 50)  # (2, B) each
    for s in range(2):
        for term, expected in zip(got, mws_by_loops(z[s], mu, logvar, 50), strict=True):
            np.testing.assert_allclose(term[s].numpy(), expected, rtol=0, atol=1e-10)


def test_the_three_terms_add_up_to_the_one_sample_kl_estimate():
    model = make("model.name=beta_tcvae", "model.latent_dim=3").double().eval()
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    torch.manual_seed(2)
    out = model(x, StepContext(dataset_size=1000))
    q, (z,) = posterior_draw(model, x, seed=2)
    log_qz_x = Normal(q.mu, q.std).log_prob(z).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    total = out.terms["mi"] + out.terms["tc"] + out.terms["dim_kl"]
    # The MWS estimates of log q(z) and log prod_k q(z_k) cancel: what is left is the
    # one-sample estimate log q(z|x) - log p(z), whatever N is.
    torch.testing.assert_close(total, log_qz_x - log_pz, rtol=0, atol=1e-10)


def test_the_sum_averages_to_the_closed_form_kl():
    """Over z ~ q(z|x) the three terms' sum averages to KL(q(z|x) || p(z)), here a few nats
    per image (torch.distributions.kl_divergence), within 5 standard errors of 20,000 draws."""
    gen = torch.Generator().manual_seed(8)
    mu = 1.5 * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(6, 3, generator=gen, dtype=torch.float64) - 1
    z = mu + (0.5 * logvar).exp() * torch.randn(20_000, 6, 3, generator=gen, dtype=torch.float64)
    total = sum(kl_decomposition(z, mu, logvar, 1000))  # (20000, B)
    exact = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    se = total.std(0) / math.sqrt(20_000)
    assert ((total.mean(0) - exact).abs() < 5 * se).all(), (total.mean(0) - exact, se)
    assert (exact > 1).all()


def test_with_unit_weights_the_loss_is_the_negative_elbo_estimate():
    x = torch.rand(4, *SHAPE)
    vae, tcvae = make("model.name=vae"), make("model.name=beta_tcvae", "model.beta=1")
    tcvae.load_state_dict(vae.state_dict())
    torch.manual_seed(3)
    a = vae(x)
    torch.manual_seed(3)
    b = tcvae(x)
    torch.testing.assert_close(b.elbo, a.elbo)  # the reported ELBO is the plain one
    torch.testing.assert_close(b.terms["kl"], a.terms["kl"])
    q, (z,) = posterior_draw(tcvae, x, seed=3)
    kl_estimate = Normal(q.mu, q.std).log_prob(z).sum(-1) - Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(b.loss, a.terms["recon"] + kl_estimate)


def test_kl_warmup_scales_the_three_terms_together():
    model = make("model.name=beta_tcvae").eval()
    x = torch.rand(4, *SHAPE)
    torch.manual_seed(4)
    full = model(x)
    torch.manual_seed(4)
    half = model(x, StepContext(step=5, kl_warmup_steps=10))
    t = full.terms
    penalty = t["mi"] + 6 * t["tc"] + t["dim_kl"]
    torch.testing.assert_close(half.loss, t["recon"] + 0.5 * penalty)


def test_without_a_dataset_size_n_is_the_batch_size():
    model = make("model.name=beta_tcvae", "model.latent_dim=3").double().eval()
    x = torch.rand(8, *SHAPE, dtype=torch.float64)
    runs = {}
    for n in (0, 8, 800):
        torch.manual_seed(5)
        runs[n] = model(x, StepContext(dataset_size=n)).terms
    torch.manual_seed(5)
    plain = model(x).terms  # no context at all
    for name in ("mi", "tc", "dim_kl"):
        torch.testing.assert_close(runs[0][name], runs[8][name], rtol=0, atol=0)
        torch.testing.assert_close(plain[name], runs[8][name], rtol=0, atol=0)
    # N enters only through log(N M): 100 times more images shift each term by a constant.
    shift = math.log(100)
    torch.testing.assert_close(runs[800]["mi"] - runs[8]["mi"], torch.full((8,), shift).double())
    torch.testing.assert_close(
        runs[800]["tc"] - runs[8]["tc"], torch.full((8,), 2 * shift).double()
    )
    torch.testing.assert_close(
        runs[800]["dim_kl"] - runs[8]["dim_kl"], torch.full((8,), -3 * shift).double()
    )


def test_mws_offsets_on_a_posterior_that_ignores_the_input():
    """Every q(z|x_j) the prior: MI, TC and dimKL are all 0 in truth. MWS weights each of the M
    densities by 1/(N M), so its q(z) integrates to 1/N: the estimates are log N, (d - 1) log N
    and -d log N, constants that leave the gradients alone and cancel in the sum."""
    b, d, n = 7, 4, 500
    z = torch.randn(3, b, d, dtype=torch.float64)
    zeros = torch.zeros(b, d, dtype=torch.float64)
    mi, tc, dim_kl = kl_decomposition(z, zeros, zeros, n)
    log_n = torch.full((3, b), math.log(n), dtype=torch.float64)
    torch.testing.assert_close(mi, log_n)
    torch.testing.assert_close(tc, (d - 1) * log_n)
    torch.testing.assert_close(dim_kl, -d * log_n)


def test_the_trainer_and_evaluate_hand_the_model_the_training_set_size(
    tmp_path, splits, monkeypatch
):
    seen = []
    original = BetaTCVAE.forward

    def forward(self, x, ctx=None):
        seen.append((self.training, ctx.dataset_size))
        return original(self, x, ctx)

    monkeypatch.setattr(BetaTCVAE, "forward", forward)
    cfg = tiny_config("model.name=beta_tcvae", "train.epochs=1")
    run = vaelab.train(cfg, tmp_path / "tc", splits=splits)
    assert set(seen) == {(True, 64), (False, 64)}  # training steps and validation
    seen.clear()
    evaluate(run, "val", iw_samples=2, progress=False, splits=splits)
    assert seen and {n for _, n in seen} == {64}
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    saved = json.loads((run / "eval" / "val.json").read_text())
    for key in ("loss", "mi", "tc", "dim_kl"):
        assert saved[key] == pytest.approx(last[key], rel=1e-6, abs=0), key


@pytest.mark.slow
def test_total_correlation_falls_as_beta_grows(tmp_path):
    """Three short runs (MLP, 6 latents, 3 epochs over the 4,500 embedded digits, one thread:
    about 6 s in all while another job shared the 2 cores): the TC of the validation codes
    falls as beta rises 1 -> 4 -> 16."""
    base = ["model.name=beta_tcvae", "model.net=mlp", "model.widths=[128]", "model.latent_dim=6",
            "train.batch_size=100", "train.epochs=3", "train.threads=1"]  # fmt: skip
    data = vaelab.data.build(tiny_config().data, progress=False)
    ctx = StepContext(dataset_size=len(data.train))
    x = data.val.batch(slice(0, 500), "cpu")
    offset = 5 * math.log(len(data.train))  # (d - 1) log N, the MWS constant
    tc = []
    for beta in (1, 4, 16):
        run = vaelab.train(
            tiny_config(*base, f"model.beta={beta}"), tmp_path / f"b{beta}", splits=data
        )
        model = vaelab.load(run).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            tc.append(model(x, ctx).terms["tc"].mean().item() - offset)
    assert tc[0] > tc[1] > tc[2], tc
    assert tc[2] < tc[0] / 2, tc  # measured: 0.41, 0.11, 0.02 nats


# -- DIP-VAE --------------------------------------------------------------------------------
def dip_by_numpy(mu: np.ndarray, logvar: np.ndarray, kind: str, od: float, d: float) -> float:
    cov = np.cov(mu, rowvar=False, bias=True)  # 1/B, the population covariance of the batch
    if kind == "ii":
        cov = cov + np.diag(np.exp(logvar).mean(0))
    off = cov - np.diag(np.diag(cov))
    return od * (off**2).sum() + d * ((np.diag(cov) - 1) ** 2).sum()


@pytest.mark.parametrize("kind", ["i", "ii"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_dip_penalty_is_the_covariance_penalty_of_numpy(kind, dtype, rtol):
    name = f"dip_vae_{kind}"
    weights = ("model.lambda_od=3", "model.lambda_d=7")
    model = make(f"model.name={name}", "model.latent_dim=4", *weights).to(dtype).eval()
    vae = make("model.name=vae", "model.latent_dim=4").to(dtype).eval()
    vae.load_state_dict(model.state_dict())
    x = torch.rand(9, *SHAPE, dtype=dtype)
    torch.manual_seed(6)
    out = model(x)
    torch.manual_seed(6)
    plain = vae(x)
    q = model.encode(x)
    expected = dip_by_numpy(
        q.mu.detach().double().numpy(), q.logvar.detach().double().numpy(), kind, 3, 7
    )
    dip = out.terms["dip"]
    assert dip.shape == (9,) and (dip == dip[0]).all()  # the batch's penalty, on every image
    assert dip[0].item() == pytest.approx(expected, rel=rtol, abs=0)
    torch.testing.assert_close(out.loss, plain.loss + dip)
    torch.testing.assert_close(out.elbo, plain.elbo)  # the reported ELBO is the plain one
    assert set(out.terms) == {"recon", "kl", "dip"}


def test_dip_ii_matches_the_covariance_of_the_aggregate_posterior():
    """DIP-VAE-II's Cov[mu] + E[diag sigma^2] is the covariance of z drawn from the mixture of
    the batch's posteriors: checked against numpy.cov of 400,000 such draws."""
    model = make("model.name=dip_vae_ii", "model.latent_dim=3").double().eval()
    x = torch.rand(8, *SHAPE, dtype=torch.float64)
    q = model.encode(x)
    rng = np.random.default_rng(0)
    mu, std = q.mu.detach().numpy(), q.std.detach().numpy()
    pick = rng.integers(0, 8, 400_000)
    draws = mu[pick] + std[pick] * rng.standard_normal((400_000, 3))
    sampled = np.cov(draws, rowvar=False, bias=True)
    np.testing.assert_allclose(model.covariance(q).detach().numpy(), sampled, rtol=0, atol=0.02)


def test_dip_defaults_follow_disentanglement_lib():
    i, ii = tiny_config("model.name=dip_vae_i").model, tiny_config("model.name=dip_vae_ii").model
    assert (i.lambda_od, i.lambda_d) == (10, 100)  # lambda_d = 10 lambda_od
    assert (ii.lambda_od, ii.lambda_d) == (10, 10)  # lambda_d = lambda_od
    tc = tiny_config("model.name=beta_tcvae").model
    assert (tc.alpha, tc.beta, tc.gamma) == (1, 6, 1)


# -- what the three models refuse -----------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("beta_tcvae", "alpha"),
        ("beta_tcvae", "beta"),
        ("beta_tcvae", "gamma"),
        ("dip_vae_i", "lambda_od"),
        ("dip_vae_i", "lambda_d"),
        ("dip_vae_ii", "lambda_od"),
        ("dip_vae_ii", "lambda_d"),
    ],
)
@pytest.mark.parametrize("value", ["-1", "inf"])
def test_a_bad_weight_is_one_line_naming_its_key(name, key, value):
    with pytest.raises(ConfigError) as err:
        tiny_config(f"model.name={name}", f"model.{key}={value}")
    message = str(err.value)
    assert f"'model.{key}'" in message and "\n" not in message, message


def test_beta_tcvae_refuses_free_bits():
    with pytest.raises(ConfigError, match="model.free_bits"):
        tiny_config("model.name=beta_tcvae", "model.free_bits=0.5")


@pytest.mark.parametrize("name", NEW)
def test_torchrun_is_refused_for_batch_statistics(name):
    cfg = tiny_config(f"model.name={name}")
    MODELS[name].check_run(cfg, 1)  # one process: fine
    with pytest.raises(ConfigError) as err:
        MODELS[name].check_run(cfg, 2)
    message = str(err.value)
    assert "'model.name'" in message and "torchrun" in message and "\n" not in message
