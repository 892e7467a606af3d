"""vq_vae: the VQ-VAE with an EMA codebook (van den Oord et al. 2017, appendix A.1).

The forward pass is checked against an independent computation written here in float64 (the
nearest code by an explicit distance table, the commitment, the Gaussian likelihood by
torch.distributions, the perplexity from counts, the EMA update of cluster sizes, sums and
codebook by a loop over the codes); the straight-through gradient against the decoder's
gradient at z_q pushed into the encoder by hand; the code prior's normalisation by enumerating
every code sequence; and a run trains, evaluates without IS or AIS (saying why), samples through
its code prior, measures its sample quality, and saves its code prior beside its weights."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.distributions import Normal

import vaelab
from tests.conftest import tiny_config
from vaelab import quality, samplers
from vaelab.checkpoint import CheckpointError, weights_metadata
from vaelab.cli import main
from vaelab.config import ConfigError
from vaelab.evaluate import evaluate
from vaelab.models import build
from vaelab.models.vq_vae import DEAD_BELOW, EPSILON, VQVAE
from vaelab.report.draw import draw_samples, run_split

SHAPE = (1, 8, 8)
MAX_DIFF: dict[str, float] = {}  # the measured differences, printed at the end (pytest -s)


def make(*overrides: str, seed: int = 0) -> VQVAE:
    """A float64 vq_vae (K = 6 codes of D = 2; L = 3 positions) with a codebook drawn at the
    scale of its encoder's outputs, as after the first training batch."""
    torch.manual_seed(seed)
    cfg = tiny_config("model.name=vq_vae", "model.latent_dim=6", "model.code_dim=2",
                      "model.codebook_size=6", *overrides)  # fmt: skip
    model = build(cfg.model, SHAPE).double()
    with torch.no_grad():
        z_e = model.encode_continuous(torch.rand(16, *SHAPE, dtype=torch.float64))
        model.start_codebook(z_e)
        model.codebook.add_(0.05 * torch.randn_like(model.codebook))  # no code on a z_e
        model.ema_embed_sum.copy_(model.codebook * 2.0)
        model.ema_cluster_size.copy_(torch.linspace(0.5, 3.0, 6, dtype=torch.float64))
    return model


def note(name: str, diff: torch.Tensor | float) -> float:
    value = float(torch.as_tensor(diff).abs().max())
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), value)
    return value


@pytest.fixture(scope="module", autouse=True)
def report_differences():
    yield
    if MAX_DIFF:
        print("\nvq_vae, max |model - independent| in float64:")
        for name, value in MAX_DIFF.items():
            print(f"  {name:<28}{value:.3g}")


# -- the objective --------------------------------------------------------------------------------
def test_the_objective_and_the_ema_update_match_an_independent_computation():
    model = make().train()
    gamma, k, positions = 0.99, 6, 3
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    e = model.codebook.clone()
    sizes, sums = model.ema_cluster_size.clone(), model.ema_embed_sum.clone()
    with torch.no_grad():  # the same train-mode networks (batch norms on the batch's statistics)
        z_e = model.encoder(x).view(5, positions, 2)
    # nearest codes by a table of squared distances, (B, L, K)
    table = torch.stack([((z_e - e[j]) ** 2).sum(-1) for j in range(k)], dim=-1)
    idx = table.argmin(-1)
    z_q = e[idx]
    with torch.no_grad():
        mean = torch.sigmoid(model.decoder(z_q.reshape(5, -1)))
    nll = -Normal(mean, math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    recon = ((x - mean) ** 2).flatten(1).sum(1)  # SSE / (2 sigma^2) with sigma^2 = 1/2
    commitment = ((z_e - z_q) ** 2).sum((1, 2))
    counts = torch.stack([(idx == j).sum() for j in range(k)]).double()
    p = counts / counts.sum()
    perplexity = math.exp(-sum(float(v * math.log(v)) for v in p if v > 0))
    # the EMA step, code by code
    new_sizes = torch.empty(k, dtype=torch.float64)
    new_e = torch.empty(k, 2, dtype=torch.float64)
    new_sums = torch.empty(k, 2, dtype=torch.float64)
    for j in range(k):
        assigned = z_e[idx == j]  # (n_j, D)
        new_sizes[j] = gamma * sizes[j] + (1 - gamma) * len(assigned)
        new_sums[j] = gamma * sums[j] + (1 - gamma) * assigned.sum(0)
    n = new_sizes.sum()
    for j in range(k):
        new_e[j] = new_sums[j] / ((new_sizes[j] + EPSILON) / (n + k * EPSILON) * n)

    out = model(x)
    assert torch.equal(out.posterior.indices, idx)  # chosen with the codebook before the step
    assert note("recon", out.terms["recon"].detach() - recon) < 1e-12
    assert note("commitment", out.terms["commitment"].detach() - commitment) < 1e-12
    assert note("perplexity", out.terms["perplexity"] - perplexity) < 1e-12
    assert (out.terms["perplexity"] == out.terms["perplexity"][0]).all()  # one per batch
    assert note("kl = L log K", out.terms["kl"] - positions * math.log(k)) < 1e-12
    assert note("elbo", out.elbo.detach() - (-nll - positions * math.log(k))) < 1e-10
    loss = recon + 0.25 * commitment
    assert note("loss", out.loss.detach() - loss) < 1e-12
    assert note("EMA cluster sizes", model.ema_cluster_size - new_sizes) < 1e-14
    assert note("EMA sums", model.ema_embed_sum - new_sums) < 1e-14
    assert note("EMA codebook", model.codebook - new_e) < 1e-13
    assert (model.codebook - e).abs().max() > 1e-3  # it did move


def test_the_codebook_moves_only_in_training_and_is_saved_with_the_weights():
    model = make().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.rand(4, *SHAPE, dtype=torch.float64))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {"prior.codebook", "ema_cluster_size", "ema_embed_sum", "codebook_started"} <= set(after)
    assert not any(b.requires_grad for b in model.buffers())
    model.train()(torch.rand(4, *SHAPE, dtype=torch.float64))
    assert not torch.equal(before["prior.codebook"], model.state_dict()["prior.codebook"])


def test_the_first_training_batch_starts_the_codebook_at_encoder_outputs():
    torch.manual_seed(0)
    cfg = tiny_config("model.name=vq_vae", "model.latent_dim=4", "model.code_dim=2",
                      "model.codebook_size=4")  # fmt: skip
    model = build(cfg.model, SHAPE).double().train()
    x = torch.rand(8, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        z_e = model.encoder(x).view(-1, 2)  # the batch's 16 code vectors
    torch.manual_seed(3)
    model.start_codebook(z_e.view(8, 2, 2))
    torch.manual_seed(3)
    assert torch.equal(model.codebook, z_e[torch.randperm(16)[:4]])  # 4 of them, distinct
    assert torch.equal(model.ema_embed_sum, model.codebook)
    assert (model.ema_cluster_size == 1).all() and model.codebook_started
    fresh = build(cfg.model, SHAPE).double().train()
    drawn = fresh.codebook.clone()
    assert not fresh.codebook_started
    fresh(x)  # the first training batch starts it, then takes one EMA step
    assert fresh.codebook_started and not torch.equal(fresh.codebook, drawn)
    fresh.eval()(x)
    assert fresh.codebook_started


def test_the_straight_through_gradient_reaches_the_encoder():
    model = make().eval()  # eval: the batch norms hold still, so two passes give one function
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    out = model(x)
    out.terms["recon"].sum().backward()
    got = [p.grad.clone() for p in model.encoder.parameters()]
    assert all(g.abs().sum() > 0 for g in got)
    assert model.codebook.grad is None and not model.codebook.requires_grad
    # by hand: d recon / d z at z = z_q (the decoder's), pushed into the encoder from z_e
    model.zero_grad(set_to_none=True)
    z_e = model.encode_continuous(x)
    z_q = model.codebook[model.nearest(z_e)].flatten(1).detach().requires_grad_(True)
    recon, _ = model.likelihood.terms(x, model.decode_logits(z_q.unsqueeze(0)))
    (grad_z,) = torch.autograd.grad(recon.sum(), z_q)
    z_e.flatten(1).backward(grad_z)
    for g, p in zip(got, model.encoder.parameters(), strict=True):
        assert note("straight-through gradient", g - p.grad) < 1e-12
    # the commitment term's gradient in z_e is 2 (z_e - z_q): it pulls the encoder to its codes
    z = model.encode_continuous(x).detach().requires_grad_(True)
    q = model.quantise(z)
    (g,) = torch.autograd.grad(((z - q.mu.view_as(z)) ** 2).sum(), z)
    torch.testing.assert_close(g, 2 * (z - q.mu.view_as(z)).detach(), rtol=0, atol=1e-14)


def test_dead_codes_are_those_whose_ema_cluster_size_is_below_the_threshold():
    model = make()
    with torch.no_grad():
        model.ema_cluster_size.copy_(
            torch.tensor([0, DEAD_BELOW / 2, DEAD_BELOW, 1, 5, 1e-9], dtype=torch.float64)
        )
    logged = model.logged(3)
    assert logged["dead_codes"].tolist() == [3.0, 3.0, 3.0]


def test_bad_keys_and_run_settings_are_one_line_errors_naming_the_key():
    base = ("model.name=vq_vae", "model.latent_dim=4")
    cases = {
        "model.codebook_size": ["model.codebook_size=1"],
        "model.code_dim": ["model.code_dim=3"],
        "model.commitment": ["model.commitment=-1"],
        "model.ema_decay": ["model.ema_decay=1"],
        "model.free_bits": ["model.free_bits=0.5"],
        "model.mc_samples": ["model.mc_samples=2"],
    }
    for key, overrides in cases.items():
        code_dim = [] if key == "model.code_dim" else ["model.code_dim=2"]
        with pytest.raises(ConfigError) as err:
            tiny_config(*base, *code_dim, *overrides)
        message = str(err.value)
        assert f"'{key}'" in message and "\n" not in message, message
    cfg = tiny_config(*base, "model.code_dim=2", "train.kl_warmup_steps=10")
    with pytest.raises(ConfigError, match="'train.kl_warmup_steps'.*vq_vae"):
        VQVAE.check_run(cfg, 1)
    cfg = tiny_config(*base, "model.code_dim=2")
    VQVAE.check_run(cfg, 1)
    with pytest.raises(ConfigError, match="'model.name': vq_vae cannot be split over torchrun"):
        VQVAE.check_run(cfg, 2)


# -- the code prior -------------------------------------------------------------------------------
def test_the_code_prior_sums_to_one_over_every_sequence_and_is_autoregressive():
    torch.manual_seed(0)
    for positions, k in [(1, 4), (3, 3), (4, 2)]:
        net = samplers.CodeMADE(positions, k, hidden=8).double()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))  # far from uniform
        prior = samplers.CodePrior(net.eval())
        every = torch.cartesian_prod(*[torch.arange(k)] * positions).view(-1, positions)
        total = torch.logsumexp(prior.log_prob(every), 0).exp()
        assert note("code prior: sum of p(c) - 1", total - 1) < 1e-12
        assert prior.log_prob(every).std() > 0.1
        # the logits of position i do not change with the codes at i and after
        c = every[torch.randperm(len(every))[:5]]
        for i in range(positions):
            changed = c.clone()
            changed[:, i:] = (changed[:, i:] + 1) % k
            torch.testing.assert_close(net(changed)[:, i], net(c)[:, i], rtol=0, atol=0)


def test_the_code_prior_learns_dependence_and_its_sampling_is_seeded():
    gen = torch.Generator().manual_seed(0)
    # position 1 copies position 0, position 2 is uniform: the marginals miss the copy
    first = torch.randint(4, (600,), generator=gen)
    codes = torch.stack([first, first, torch.randint(4, (600,), generator=gen)], 1)
    train, val = codes[:500], codes[500:]
    prior = samplers.fit_code_prior(train, 4, seed=0, val=val, hidden=16, max_epochs=60, lr=1e-2)
    info = prior.info
    assert info["val_nll_uniform_nats"] == pytest.approx(3 * math.log(4))
    assert info["val_nll_marginals_nats"] == pytest.approx(3 * math.log(4), abs=0.1)
    assert info["val_nll_nats"] < 2 * math.log(4) + 0.1  # learnt the copy: one position free
    again = samplers.fit_code_prior(train, 4, seed=0, val=val, hidden=16, max_epochs=60, lr=1e-2)
    for key, value in prior.net.state_dict().items():
        assert torch.equal(value, again.net.state_dict()[key]), key  # seeded fit
    a, b = prior.sample(200, seed=1), prior.sample(200, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, prior.sample(200, seed=2))
    assert (a[:, 1] == a[:, 0]).float().mean() > 0.9  # the samples copy too
    cold = prior.sample(200, temperature=0.05, seed=1)
    assert (cold[:, 1] == cold[:, 0]).all()


# -- a run ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch vq_vae on 200 random 8x8 digits (the CLI rebuilds the data from the run)."""
    home = tmp_path_factory.mktemp("vq")
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (200, 784)), np.arange(200)[:, None] % 10], 1)
    np.savetxt(home / "digits.csv", rows, fmt="%d", delimiter=",")
    cfg = tiny_config(f"data.root={home / 'digits.csv'}", "data.size=8", "model.name=vq_vae",
                      "model.latent_dim=4", "model.code_dim=2", "model.codebook_size=8",
                      "train.epochs=1")  # fmt: skip
    return vaelab.train(cfg, home / "run")


def test_evaluation_reports_the_elbo_and_says_why_there_is_no_is_or_ais(run):
    result = evaluate(run, "val", iw_samples=4, ais_steps=2, progress=False)
    assert "discrete latent" in result["likelihood_skipped"]
    assert "iw_nll_nats" not in result and "ais_nll_nats" not in result
    assert result["kl"] == pytest.approx(2 * math.log(8))
    for key in ("elbo_nats", "recon", "commitment", "perplexity", "dead_codes", "mse_per_pixel"):
        assert math.isfinite(result[key]), key
    assert 1 <= result["perplexity"] <= 8


def test_the_code_prior_is_saved_with_the_run_reloaded_and_refitted_for_new_weights(
    run, monkeypatch
):
    model = vaelab.load(run)
    train, val = run_split(run, "train"), run_split(run)
    prior = samplers.code_prior(run, model, train, val)
    saved = samplers.code_prior_path(run)
    assert saved.is_file() and prior.info["step"] == weights_metadata(run)["step"]
    assert prior.info["val_nll_uniform_nats"] == pytest.approx(2 * math.log(8))
    assert math.isfinite(prior.info["val_nll_nats"]) and prior.info["val_images"] == len(val)
    loaded = samplers.CodePrior.load(saved)
    assert loaded.info == prior.info
    codes = samplers.code_indices(model, val)
    assert codes.shape == (len(val), 2) and codes.dtype == torch.int64
    torch.testing.assert_close(loaded.log_prob(codes), prior.log_prob(codes), rtol=0, atol=0)
    assert torch.equal(loaded.sample(10, seed=4), prior.sample(10, seed=4))

    def never(*args, **kwargs):
        raise AssertionError("fitted again")

    with monkeypatch.context() as mp:  # the current weights' prior is reused
        mp.setattr(samplers, "fit_code_prior", never)
        samplers.code_prior(run, model, train, val)
    stale = samplers.CodePrior(prior.net, {**prior.info, "step": -1})
    stale.save(saved)
    assert samplers.code_prior(run, model, train, val).info["step"] == prior.info["step"]
    # a file vaelab did not write is refused, not overwritten
    save_file({"w": torch.zeros(2)}, str(saved))
    with pytest.raises(CheckpointError, match="code_prior.safetensors.*expected a vaelab code"):
        samplers.code_prior(run, model, train, val)
    assert set(load_file(saved)) == {"w"}
    saved.unlink()


def spy_code_prior(monkeypatch) -> list:
    """Each draw of codes from a fitted code prior, recorded (n, ...)."""
    calls: list = []
    original = samplers.CodePrior.sample
    monkeypatch.setattr(
        samplers.CodePrior,
        "sample",
        lambda self, *a, **k: calls.append(a) or original(self, *a, **k),
    )
    return calls


def test_sample_draws_through_the_code_prior_and_gmm_is_refused(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "vq.png"
    assert main(["sample", str(run), "-n", "16", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0 and samplers.code_prior_path(run).is_file()
    again = tmp_path / "again.png"
    drawn = spy_code_prior(monkeypatch)
    draw_samples(run, again, 16)
    assert [a[0] for a in drawn] == [16]  # the codes came from the fitted prior, not uniform
    assert np.asarray(Image.open(out)).tolist() == np.asarray(Image.open(again)).tolist()
    gmm = tmp_path / "gmm.png"
    assert main(["sample", str(run), "--sampler", "gmm", "--out", str(gmm)]) == 2
    err = capsys.readouterr().err
    assert (
        "--sampler gmm" in err and "discrete latent" in err and len(err.strip().splitlines()) == 1
    )
    assert not gmm.exists()


def test_quality_measures_the_code_prior_samples_and_records_its_fit(run, tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quality, "CLASSIFIER_STEPS", 20)
    drawn = spy_code_prior(monkeypatch)
    assert main(["quality", str(run), "--images", "20", "--quiet"]) == 0
    assert [a[0] for a in drawn] == [20]  # its "prior" samples are the code prior's
    result = json.loads((run / "eval" / "quality_val.json").read_text())
    assert set(result["samplers"]) == {"prior"}
    entry = result["samplers"]["prior"]
    assert entry["fid_classifier"] >= 0
    assert entry["val_nll_uniform_nats"] == pytest.approx(2 * math.log(8))
    for key in ("val_nll_nats", "val_nll_marginals_nats"):
        assert math.isfinite(entry[key]), key
