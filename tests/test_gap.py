"""The ELBO gap taken apart (vaelab.gap, `vaelab gap`), the estimators' standard errors, and the
faster form of the model the sampling estimators run (speed.for_sampling)."""

import json
import math

import pytest
import torch
from torch import nn

from tests.test_evaluate import K_DIMS, D, LinearGaussianVAE
from vaelab import ais, gap, metrics, speed
from vaelab.config import ConfigError
from vaelab.evaluate import gap_decomposition
from vaelab.models.base import DiagonalGaussian

W = torch.tensor([[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.5, 0.4], [0.9, 1.0], [1.2, 1.0]])
S2 = 0.5


def ppca(dtype=torch.float64):
    model = LinearGaussianVAE(W.to(dtype), torch.linspace(-0.5, 0.5, K_DIMS).to(dtype), S2)
    return model.to(dtype).eval()


def simulate(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g, dtype=model.w.dtype)
    noise = math.sqrt(S2) * torch.randn(n, K_DIMS, generator=g, dtype=model.w.dtype)
    return (z @ model.w.T + model.b + noise).view(n, 1, 1, K_DIMS)


class Floats:
    """The dataset interface of the evaluation pass over given images (any real values)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def batch(self, index, device):
        return self.x[index].to(device)


def exact_elbo(model, x, q):
    """ELBO(q) in closed form for p(x|z) = N(Wz + b, s2 I): E_q||x - Wz - b||^2 = ||x - W mu -
    b||^2 + sum_j |W_j|^2 var_j."""
    r = x.flatten(1) - q.mu @ model.w.T - model.b
    sq = r.square().sum(1) + (q.logvar.exp() * model.w.square().sum(0)).sum(1)
    log_lik = -0.5 * sq / S2 - 0.5 * K_DIMS * math.log(2 * math.pi * S2)
    return log_lik - q.kl()


def test_log_mean_exp_variance_is_the_delta_method_and_matches_repeated_estimates():
    torch.manual_seed(0)
    k, reps = 200, 4000
    log_w = 0.8 * torch.randn(reps, k, dtype=torch.float64)  # log-normal weights
    lse, lse_sq = torch.logsumexp(log_w, 1), torch.logsumexp(2 * log_w, 1)
    var = ais.log_mean_exp_variance(lse, lse_sq, k)
    w = log_w.exp()
    direct = w.var(1, correction=0) / (k * w.mean(1).square())
    torch.testing.assert_close(var, direct)
    estimates = lse - math.log(k)  # log of the mean weight, one per repetition
    assert var.mean().item() == pytest.approx(estimates.var().item(), rel=0.1)
    equal = torch.zeros(1, 5, dtype=torch.float64)  # equal weights: no noise at all
    assert ais.log_mean_exp_variance(
        torch.logsumexp(equal, 1), torch.logsumexp(2 * equal, 1), 5
    ).item() == pytest.approx(0.0, abs=1e-12)


def test_the_stated_variance_of_the_importance_estimate_is_its_variance():
    model = ppca()
    x = simulate(model, 4)
    torch.manual_seed(3)
    logs, stated = zip(
        *[metrics.importance_estimate(model, x, 256) for _ in range(1000)], strict=True
    )
    # on average over repetitions, the stated variance is the estimates' spread (the delta
    # method understates it a little for skewed weights: by about 10% here, 20% at K = 64)
    torch.testing.assert_close(
        torch.stack(stated).mean(0), torch.stack(logs).var(0), rtol=0.2, atol=0
    )


def test_compare_elbos_matches_the_closed_form_and_states_its_noise(monkeypatch):
    model = ppca()
    x = simulate(model, 5)
    q = model.encode(x)
    q_star = DiagonalGaussian(q.mu + 0.3, q.logvar - 0.5)
    monkeypatch.setattr(metrics, "MAX_ELEMENTS", 5 * K_DIMS * 7)  # chunks of 7 samples
    torch.manual_seed(0)
    est = gap.compare_elbos(model, x, q, q_star, 3000)
    for value, var, post in [(est.elbo_q, est.elbo_q_var, q),
                             (est.elbo_q_star, est.elbo_q_star_var, q_star)]:  # fmt: skip
        exact = exact_elbo(model, x, post)
        assert ((value - exact).abs() < 4 * var.sqrt()).all()
        assert (var > 0).all()
    # the stated variance of a 100-sample estimate, on average, is its variance over repetitions
    repeats = [gap.compare_elbos(model, x, q, q_star, 100) for _ in range(300)]
    spread = torch.stack([r.elbo_q for r in repeats]).var(0)
    stated = torch.stack([r.elbo_q_var for r in repeats]).mean(0)
    torch.testing.assert_close(stated, spread, rtol=0.25, atol=0)
    # the same draws for q and q*: the difference has less noise than either estimate
    assert (est.difference_var < est.elbo_q_var).all()


def test_ais_from_q_is_tighter_than_from_the_prior_and_brackets_with_bdmc():
    """AIS started at the encoder's q(z|x) (run in q's whitened coordinates) estimates the same
    log p(x), tighter at every T on probabilistic PCA (measured: T = 20, 400 images, 8 chains:
    0.017 nats below the exact value against 0.064 from the prior); reverse chains from exact
    posterior samples back to q bound it from above."""
    torch.manual_seed(0)
    model = ppca()
    x = simulate(model, 400, seed=2)
    exact = model.exact_log_px(x).mean().item()
    q = model.encode(x)
    from_prior = ais.model_ais(model, x, 8, 20).log_px().mean().item()
    from_q = ais.model_ais(model, x, 8, 20, q=q).log_px().mean().item()
    assert exact - 0.04 < from_q < exact + 0.02
    assert from_q > from_prior
    precision = torch.eye(D, dtype=torch.float64) + model.w.T @ model.w / S2
    cov = torch.linalg.inv(precision)
    mean = (x.flatten(1) - model.b) @ model.w @ cov / S2
    z = mean + torch.randn(400, D, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    lower = ais.model_ais(model, x, 8, 20, q=q).bound().mean().item()
    upper = ais.model_ais(model, x, 8, 20, z0=z, q=q).bound().mean().item()
    assert lower < exact < upper


def test_the_gap_metric_orders_the_estimates_of_a_model_with_an_exact_likelihood():
    """On probabilistic PCA: log p(x) (AIS) within noise of the exact value, ELBO(q*) between
    it and ELBO(q), the approximation gap close to KL(q* || p(z|x)) of the best diagonal
    Gaussian; every batch ordered."""
    model = ppca()
    x = simulate(model, 120, seed=1)
    dataset = Floats(x)
    collect, seconds = gap.Collector(), {}
    options = metrics.Options(200, 300, 8, 300, 16, 0.02, 2000)
    torch.manual_seed(0)
    metrics.evaluation_pass(model, dataset, ["importance", "ais", "gap"], options=options,
                            on_batch=collect, seconds=seconds)  # fmt: skip
    row = collect.totals.row()
    exact = model.exact_log_px(x).mean()
    assert row["log_px_ais"] == pytest.approx(exact.item(), abs=0.05)
    precision = torch.eye(D, dtype=torch.float64) + W.double().T @ W.double() / S2
    best = 1.0 / torch.diagonal(precision)
    kl = 0.5 * ((torch.diagonal(precision) * best).sum() - D - torch.logdet(precision)
                - best.log().sum())  # fmt: skip
    assert row["approximation_gap"] == pytest.approx(kl.item(), abs=0.05)
    assert row["amortization_gap"] > 0
    assert row["ordered"] and row["ordered_within_noise"]
    assert [b["images"] for b in collect.batches] == [100, 20]
    assert all(b["ordered_within_noise"] for b in collect.batches)
    assert set(seconds) == {"importance", "ais", "gap"}


def test_ordering_names_what_fails_only_beyond_the_noise():
    mean = {"log_px_ais": -10.0, "iw_bound": -10.2, "elbo_q_star": -9.9, "elbo_q": -11.0}
    noise = {"log_px_ais": 0.02, "iw_bound": 0.01, "elbo_q_star": 0.02, "elbo_q": 0.02,
             "amortization_gap": 0.001}  # fmt: skip
    assert gap.ordering(mean, noise) == {"ordered": False, "ordered_within_noise": False}
    noise["log_px_ais"] = 0.05  # 0.1 below ELBO(q*) is within 3 standard errors of 0.054
    assert gap.ordering(mean, noise) == {"ordered": False, "ordered_within_noise": True}
    mean["log_px_ais"] = -9.8
    assert gap.ordering(mean, noise) == {"ordered": True, "ordered_within_noise": True}


def test_pass_values_with_an_underscore_reach_on_batch_only():
    model = ppca()
    seen = []
    result = metrics.evaluation_pass(model, Floats(simulate(model, 30)), ["importance"],
                                     options=metrics.Options(iw_samples=4),
                                     on_batch=seen.append)  # fmt: skip
    assert "_log_px_var" in seen[0] and seen[0]["_log_px_var"].shape == (30,)
    assert not any(k.startswith("_") for k in result)


def test_folding_batch_norms_keeps_the_function():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2)),
        nn.Sequential(
            nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
        ),
        nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2, affine=False)),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics and affine parameters far from 0 and 1
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -1, 1)
    x = torch.randn(5, 2, 6, 6)
    training = speed.fold_batch_norms(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    assert isinstance(training[1], nn.BatchNorm2d)  # in training mode: left alone
    net.eval()
    expected = net(x)
    folded = speed.fold_batch_norms(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_for_sampling_is_a_faster_copy_of_the_same_function(runs):
    import vaelab

    made, _ = runs
    model = vaelab.load(made["vae"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = speed.for_sampling(model, channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.decoder.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.decoder.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original is untouched
    assert not any(p.requires_grad for p in fast.parameters())
    z = torch.randn(7, model.cfg.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast.decode_logits(z), model.decode_logits(z), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


def test_gap_decomposition_writes_every_number_with_its_noise(runs):
    made, splits = runs
    kw = dict(progress=False, splits=splits, ais_steps=3, ais_chains=2, iw_samples=5,
              q_star_steps=2)  # fmt: skip
    result = gap_decomposition(made["vae"], "val", images=12, **kw)
    saved = json.loads((made["vae"] / "eval" / "gap_val.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert result["num_images"] == 12 and result["num_batches"] == 1
    for key in gap.KEYS:
        assert key in result and key in result["noise"] and result["noise"][key] >= 0
    assert result["approximation_gap"] == pytest.approx(
        result["log_px_ais"] - result["elbo_q_star"]
    )
    assert result["amortization_gap"] == pytest.approx(result["elbo_q_star"] - result["elbo_q"])
    assert result["settings"]["ais_steps"] == 3 and result["settings"]["q_star_steps"] == 2
    assert set(result["seconds"]) == {"importance", "ais", "q_star", "total"}
    assert result["batches"][0]["images"] == 12
    assert result["batches"][0]["log_px_ais"] == pytest.approx(result["log_px_ais"])
    # the same AIS and IW numbers as vaelab evaluate on the same images and settings
    from vaelab.evaluate import evaluate

    ev = evaluate(made["vae"], "val", 5, progress=False, splits=splits, ais_steps=3,
                  ais_chains=2, images=12)  # fmt: skip
    assert -ev["ais_nll_nats"] == pytest.approx(result["log_px_ais"], rel=1e-6)
    assert -ev["iw_nll_nats"] == pytest.approx(result["iw_bound"], rel=1e-6)

    only = gap_decomposition(made["decoder_only"], "val", images=12, **kw)
    assert "elbo_q" not in only and "log_px_ais" in only and "iw_bound" in only
    assert "q_star" not in only["seconds"]

    bad_values = [({"ais_steps": 0}, "--ais-steps"), ({"q_star_steps": 0}, "--q-star-steps"),
                  ({"images": 0}, "--images"), ({"iw_samples": 0}, "--iw-samples")]  # fmt: skip
    for bad, flag in bad_values:
        with pytest.raises(ConfigError, match=flag):
            gap_decomposition(made["vae"], "val", **{**kw, **bad})


def test_runs_are_evaluated_on_the_gpu_they_trained_on_when_one_is_here(monkeypatch):
    from vaelab.evaluate import evaluation_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [evaluation_device(d).type for d in ("cpu", "cuda", "auto")] == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [evaluation_device(d).type for d in ("cpu", "cuda", "auto")] == ["cpu", "cuda", "cuda"]
