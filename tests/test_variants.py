"""The variants that control the rate/distortion trade-off, each against its definition."""

import math

import pytest
import torch

from tests.conftest import posterior_draw, tiny_config
from vaelab import losses
from vaelab.models import build
from vaelab.models.base import StepContext
from vaelab.models.beta_vae_capacity import capacity

SHAPE = (1, 8, 8)


def make(*overrides):
    torch.manual_seed(0)
    return build(tiny_config(*overrides).model, SHAPE)


def test_capacity_schedule_step_by_step():
    cfg = tiny_config(
        "model.name=beta_vae_capacity", "model.capacity_max=20", "model.capacity_steps=10"
    ).model
    assert [capacity(cfg, s) for s in range(0, 13, 2)] == pytest.approx(
        [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 20.0]
    )


@pytest.mark.parametrize("step", [0, 50, 10_000])
def test_capacity_penalty_is_gamma_times_distance_to_c(step):
    model = make("model.name=beta_vae_capacity", "model.gamma=7", "model.capacity_max=3",
                 "model.capacity_steps=100")  # fmt: skip
    kl_dims = (torch.rand(6, 2) * 3).requires_grad_()
    c = 3 * min(1, step / 100)
    penalty = model.kl_penalty(kl_dims, StepContext(step=step))
    kl = kl_dims.sum(-1)
    assert penalty.mean().item() == pytest.approx(7 * abs(kl.mean().item() - c), rel=1e-5)
    penalty.mean().backward()
    # d/dKL_i of gamma |mean KL - C| = gamma sign(mean KL - C) / B, for every image.
    expected = 7 * math.copysign(1, kl.mean().item() - c) / 6
    torch.testing.assert_close(kl_dims.grad, torch.full_like(kl_dims, expected))


def gaussian_nll(x, mean, sigma2):
    """-log N(x; mean, sigma2 I) per row, written out independently of vaelab."""
    k = x[0].numel()
    return ((x - mean) ** 2).flatten(1).sum(1) / (2 * sigma2) + 0.5 * k * math.log(
        2 * math.pi * sigma2
    )


def test_sigma_vae_trains_with_the_closed_form_optimal_variance():
    model = make("model.name=sigma_vae").train()
    x = torch.rand(5, *SHAPE)
    logits = torch.randn(3, 5, *SHAPE)
    recon, nll = model.likelihood.terms(x, logits)
    mean = torch.sigmoid(logits)
    sse = ((x - mean) ** 2).flatten(2).sum(2)  # (m, B)
    sigma2 = sse.mean().item() / 64
    flat_x, flat_mean = x.expand(3, *x.shape).flatten(0, 1), mean.flatten(0, 1)
    torch.testing.assert_close(nll, gaussian_nll(flat_x, flat_mean, sigma2).view(3, 5))
    # It is the optimum: any other shared variance gives a larger total NLL.
    total = nll.sum().item()
    for factor in (0.5, 0.9, 1.1, 2.0):
        assert gaussian_nll(flat_x, flat_mean, factor * sigma2).sum().item() > total
    assert torch.allclose(recon, nll - 32 * math.log(2 * math.pi))
    # The first training batch sets the model's variance; later ones move it by MOMENTUM.
    assert model.likelihood.sigma2.item() == pytest.approx(sigma2)
    model.likelihood.terms(x, torch.zeros_like(logits))  # every mean 1/2
    batch = ((x - 0.5) ** 2).sum().item() / (5 * 64)
    assert model.likelihood.sigma2.item() == pytest.approx(0.9 * sigma2 + 0.1 * batch)


def test_sigma_vae_evaluates_one_fixed_variance_whatever_the_batch():
    model = make("model.name=sigma_vae").train()
    x = torch.rand(6, *SHAPE)
    model.likelihood.terms(x, torch.randn(1, 6, *SHAPE))  # fits the variance
    fitted = model.likelihood.sigma2.item()
    model.eval()
    logits = torch.randn(2, 6, *SHAPE)
    whole = model.likelihood.terms(x, logits)[1]
    parts = torch.cat(
        [model.likelihood.terms(x[i : i + 2], logits[:, i : i + 2])[1] for i in (0, 2, 4)], 1
    )
    torch.testing.assert_close(whole, parts)  # per image: no batch statistic in evaluation
    flat_x = x.expand(2, *x.shape).flatten(0, 1)
    expected = gaussian_nll(flat_x, torch.sigmoid(logits).flatten(0, 1), fitted).view(2, 6)
    torch.testing.assert_close(whole, expected)
    assert model.likelihood.sigma2.item() == fitted  # evaluation does not move it
    assert "likelihood.sigma2" in model.state_dict()  # saved with the weights


def test_iwae_with_one_sample_is_the_elbo():
    model = make("model.name=iwae", "model.mc_samples=1").eval()
    x = torch.rand(4, *SHAPE)
    torch.manual_seed(3)
    out = model(x)
    q, z = posterior_draw(model, x, seed=3)
    nll = model.likelihood.terms(x, model.decode_logits(z))[1]
    single = -nll[0] + losses.standard_normal_log_prob(z[0]) - q.log_prob(z[0])
    torch.testing.assert_close(out.loss, -single)  # the one-sample ELBO estimate
    # Its expectation is the ELBO with the closed-form KL.
    with torch.no_grad():  # 2000 copies of the batch: 2000 independent draws per image
        out = model(x.repeat(2000, 1, 1, 1))
    draws, elbo = out.loss.view(2000, 4).mean(0), out.elbo.view(2000, 4).mean(0)
    # Standard error of the mean of 2000 draws: a few hundredths of a nat here.
    torch.testing.assert_close(draws, -elbo, atol=0.3, rtol=0)


def test_iwae_bound_rises_with_k():
    x = torch.rand(8, *SHAPE)
    k1 = make("model.name=iwae", "model.mc_samples=1").eval()
    k50 = make("model.name=iwae", "model.mc_samples=50").eval()
    k50.load_state_dict(k1.state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        one = torch.stack([k1(x).loss for _ in range(200)]).mean()
        fifty = torch.stack([k50(x).loss for _ in range(20)]).mean()
    assert fifty < one  # -L_50 < -L_1: the bound is tighter


def test_free_bits():
    kl_dims = torch.tensor([[0.1, 2.0, 0.4], [0.3, 1.0, 0.8]], requires_grad=True)
    out = losses.free_bits_kl(kl_dims, 0.5)
    # Dimension means: 0.2 (below), 1.5 (above), 0.6 (above).
    torch.testing.assert_close(out, torch.tensor([0.5 + 2.0 + 0.4, 0.5 + 1.0 + 0.8]))
    assert out.mean().item() == pytest.approx(0.5 + 1.5 + 0.6)
    out.sum().backward()
    assert kl_dims.grad[:, 0].abs().sum() == 0 and (kl_dims.grad[:, 1:] == 1).all()
    torch.testing.assert_close(losses.free_bits_kl(kl_dims, 0.0), kl_dims.sum(-1))


def test_free_bits_and_warmup_reach_the_loss():
    x = torch.rand(4, *SHAPE)
    model = make("model.free_bits=100").eval()
    torch.manual_seed(1)
    out = model(x)
    recon = out.terms["recon"]
    torch.testing.assert_close(out.loss, recon + 100 * 2)  # both dimensions below 100 nats
    torch.manual_seed(1)
    start = StepContext(step=0, kl_warmup_steps=10)
    torch.testing.assert_close(model(x, start).loss, recon)  # no KL weight at warm-up's start
    torch.manual_seed(1)
    half = StepContext(step=5, kl_warmup_steps=10)
    torch.testing.assert_close(model(x, half).loss, recon + 0.5 * 100 * 2)


def test_kl_warmup_schedule():
    assert [losses.kl_warmup(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert losses.kl_warmup(0, 0) == 1.0
    assert [StepContext(step=s, kl_warmup_steps=4).kl_anneal for s in (0, 1, 4)] == [0, 0.25, 1]


def test_iwae_loss_is_the_log_mean_exp_of_the_weights():
    model = make("model.name=iwae", "model.mc_samples=7").eval()
    x = torch.rand(3, *SHAPE)
    torch.manual_seed(4)
    out = model(x)
    q, z = posterior_draw(model, x, seed=4, k=7)
    nll = model.likelihood.terms(x, model.decode_logits(z))[1]
    log_w = -nll + losses.standard_normal_log_prob(z) - q.log_prob(z)  # (7, B)
    expected = -(torch.logsumexp(log_w, 0) - math.log(7))
    torch.testing.assert_close(out.loss, expected)
    assert (out.loss < -log_w.mean(0)).all()  # tighter than the mean of the weights (Jensen)


def test_trainer_hands_the_step_context_to_the_model(tmp_path, splits, monkeypatch):
    from vaelab import train
    from vaelab.models.vae import VAE

    seen = []
    original = VAE.forward

    def forward(self, x, ctx=None):
        if self.training:
            seen.append((ctx.step, ctx.epoch, ctx.kl_anneal))
        return original(self, x, ctx)

    monkeypatch.setattr(VAE, "forward", forward)
    cfg = tiny_config("train.epochs=1", "train.kl_warmup_steps=4")
    train(cfg, tmp_path / "run", splits=splits)
    assert seen == [(0, 1, 0.0), (1, 1, 0.25), (2, 1, 0.5), (3, 1, 0.75)]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.name=iwae", "model.free_bits=1"], "model.free_bits"),
        (["model.name=beta_vae_capacity", "model.free_bits=1"], "model.free_bits"),
    ],
)
def test_options_a_variant_ignores_are_refused(overrides, key):
    from vaelab.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        tiny_config(*overrides)


def test_warmup_is_refused_for_iwae(tmp_path, splits):
    from vaelab import train
    from vaelab.config import ConfigError

    with pytest.raises(ConfigError, match="train.kl_warmup_steps"):
        train(
            tiny_config("model.name=iwae", "train.kl_warmup_steps=5"), tmp_path / "r", splits=splits
        )
    assert not (tmp_path / "r").exists()
