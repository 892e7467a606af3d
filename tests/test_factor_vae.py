"""FactorVAE: the objective against the discriminator computed by hand (numpy, float64, from its
weights) on the same shuffle; which part's gradient reaches which parameters; the discriminator
as a TC estimator; its own Adam group; exact resume with both groups' state."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vaelab
from tests.conftest import posterior_draw, tiny_config
from vaelab import trainer
from vaelab.config import ConfigError
from vaelab.models import MODELS, build
from vaelab.models.base import StepContext
from vaelab.models.factor_vae import cross_entropy, discriminator, permute_dims
from vaelab.rng import batch_rand, global_batch_rand, noise_shard
from vaelab.trainer import read_metrics

SHAPE = (1, 8, 8)
SMALL_D = ("model.disc_layers=2", "model.disc_width=16")


def make(*overrides: str):
    torch.manual_seed(0)
    return build(tiny_config("model.name=factor_vae", *SMALL_D, *overrides).model, SHAPE)


def discriminator_by_hand(model, z: np.ndarray) -> np.ndarray:
    """The discriminator's logits (..., 2) from its weights: affine maps and LeakyReLU(0.2)."""
    linears = [m for m in model.discriminator if isinstance(m, torch.nn.Linear)]
    h = z
    for n, layer in enumerate(linears):
        w = layer.weight.detach().double().numpy()
        b = layer.bias.detach().double().numpy()
        h = h @ w.T + b
        if n < len(linears) - 1:
            h = np.where(h > 0, h, 0.2 * h)
    return h


def log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def shuffle_by_hand(z: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Each (sample, dimension) column of z (m, B, d) reordered by sorting its noise."""
    out = np.empty_like(z)
    m, b, d = z.shape
    for s in range(m):
        for k in range(d):
            order = sorted(range(b), key=lambda i: noise[s, i, k])
            out[s, :, k] = [z[s, i, k] for i in order]
    return out


# -- the objective ----------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_objective_is_the_discriminator_by_hand_on_the_same_shuffle(dtype, tol):
    model = make("model.latent_dim=3", "model.mc_samples=2", "model.gamma=7").to(dtype).eval()
    x = torch.rand(6, *SHAPE, dtype=dtype)
    torch.manual_seed(1)
    out = model(x)
    _, z = posterior_draw(model, x, seed=1, k=2)  # (2, B, d): the forward pass's draws
    noise = torch.rand(2, 6, 3).numpy()  # then the shuffle's noise, drawn next
    z = z.detach().double().numpy()
    joint = discriminator_by_hand(model, z)  # (2, B, 2)
    shuffled = discriminator_by_hand(model, shuffle_by_hand(z, noise))
    tc = (joint[..., 0] - joint[..., 1]).mean(0)
    disc = 0.5 * (-log_softmax(joint)[..., 0] - log_softmax(shuffled)[..., 1]).mean(0)
    acc = 0.5 * ((joint[..., 0] > joint[..., 1]) + (shuffled[..., 1] > shuffled[..., 0])).mean(0)
    got = {k: v.detach().double().numpy() for k, v in out.terms.items()}
    np.testing.assert_allclose(got["tc"], tc, rtol=0, atol=tol)
    np.testing.assert_allclose(got["disc_loss"], disc, rtol=0, atol=tol)
    np.testing.assert_array_equal(got["disc_acc"], acc)
    loss = got["recon"] + got["kl"] + 7 * tc + disc
    np.testing.assert_allclose(out.loss.detach().double().numpy(), loss, rtol=0, atol=100 * tol)
    # The reported ELBO is the plain one: that of a VAE with the same weights.
    vae = build(tiny_config("model.name=vae", "model.latent_dim=3", "model.mc_samples=2").model,
                SHAPE).to(dtype).eval()  # fmt: skip
    vae.load_state_dict({k: v for k, v in model.state_dict().items() if "discriminator" not in k})
    torch.manual_seed(1)
    plain = vae(x)
    torch.testing.assert_close(out.elbo, plain.elbo, rtol=0, atol=0)
    assert set(out.terms) == {"recon", "kl", "tc", "disc_loss", "disc_acc"}
    assert all(t.shape == (6,) for t in out.terms.values())


def test_each_part_of_the_loss_trains_only_its_own_parameters():
    model = make("model.latent_dim=3").train()
    x = torch.rand(8, *SHAPE)
    torch.manual_seed(2)
    out = model(x, StepContext())
    disc_params = list(model.discriminator.parameters())
    mine = {id(p) for p in disc_params}
    vae_params = [p for p in model.parameters() if id(p) not in mine]
    encoder = list(model.encoder.parameters())

    def grads(value, params):
        return torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)

    t = out.terms
    # The TC term reaches the encoder and not the discriminator; the discriminator's loss
    # the reverse.
    assert all(g is None for g in grads(t["tc"].sum(), disc_params))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(t["tc"].sum(), encoder))
    assert all(g is None for g in grads(t["disc_loss"].sum(), vae_params))
    assert all(g.abs().sum() > 0 for g in grads(t["disc_loss"].sum(), disc_params))
    # One backward of the loss: the discriminator's gradient is that of its loss alone, the
    # VAE's that of recon + KL + gamma * TC alone.
    full = grads(out.loss.mean(), [*vae_params, *disc_params])
    vae_part = grads((t["recon"] + t["kl"] + 35 * t["tc"]).mean(), vae_params)
    disc_part = grads(t["disc_loss"].mean(), disc_params)
    for got, want in zip(full, [*vae_part, *disc_part], strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want)


def test_the_shuffle_permutes_each_dimension_across_the_batch():
    z = torch.arange(2 * 50 * 3, dtype=torch.float64).reshape(2, 50, 3)
    out = permute_dims(z, torch.rand(2, 50, 3))
    for s in range(2):
        for k in range(3):
            assert sorted(out[s, :, k].tolist()) == z[s, :, k].tolist()  # the same values
    assert not torch.equal(out, z)
    # Dimensions are shuffled independently: rows no longer hold one image's code.
    assert not torch.equal(out[0, :, 0] - out[0, :, 1], z[0, :, 0] - z[0, :, 1])


def test_the_global_shuffle_noise_is_what_batch_noise_draws_from():
    torch.manual_seed(4)
    whole = torch.rand(2, 7, 3)
    after = torch.rand(1)
    for rank in range(2):
        torch.manual_seed(4)
        with noise_shard(rank, 2, 7):
            got = global_batch_rand((2, len(range(rank, 7, 2)), 3), 1, device="cpu")
        assert torch.equal(got, whole)
        assert torch.equal(torch.rand(1), after)  # the generator moved as one process's did
        torch.manual_seed(4)
        with noise_shard(rank, 2, 7):
            mine = batch_rand((2, len(range(rank, 7, 2)), 3), 1, device="cpu")
        assert torch.equal(mine, whole[:, rank::2])
    torch.manual_seed(4)
    assert torch.equal(global_batch_rand((2, 7, 3), 1, device="cpu"), whole)  # one process


def test_the_discriminator_estimates_the_total_correlation_of_a_gaussian():
    """Codes z ~ N(0, [[1, rho], [rho, 1]]): TC = -1/2 log(1 - rho^2) = 0.51 nats at rho = 0.8.
    The discriminator trained on them against their shuffles (the paper's betas, 1,000 steps
    of 256; about 2 s in one thread) gives log-odds whose mean is near it (measured: 0.41-0.57
    over seeds 0-3, 0.46 at seed 0), and its loss falls below chance, ln 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only contends with other jobs
    try:
        torch.manual_seed(0)
        rho = 0.8
        mix = torch.tensor([[1.0, 0.0], [rho, math.sqrt(1 - rho**2)]])
        disc = discriminator(2, 2, 64)
        opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))
        for _ in range(1000):
            z = torch.randn(1, 256, 2) @ mix.T
            shuffled = permute_dims(z, torch.rand(1, 256, 2))
            loss = 0.5 * (cross_entropy(disc(z), 0) + cross_entropy(disc(shuffled), 1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = disc(torch.randn(20_000, 2) @ mix.T)
    finally:
        torch.set_num_threads(threads)
    estimate = (logits[:, 0] - logits[:, 1]).mean().item()
    exact = -0.5 * math.log(1 - rho**2)
    assert estimate == pytest.approx(exact, abs=0.15), (estimate, exact)
    assert loss.item() < math.log(2) - 0.05


# -- training: two Adam groups, resume --------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_the_discriminator_has_its_own_adam_group_and_schedule(splits, fused):
    cfg = tiny_config(
        *("model.name=factor_vae", *SMALL_D, "model.disc_lr=0.0003", "model.disc_betas=[0.4,0.8]"),
        *("train.lr=0.002", "train.lr_schedule=cosine", f"train.fused_adam={str(fused).lower()}"),
    )
    session = trainer.setup(cfg, splits)
    vae_group, disc_group = session.optimizer.param_groups
    assert {id(p) for p in disc_group["params"]} == {
        id(p) for p in session.model.discriminator.parameters()
    }
    assert len(vae_group["params"]) + len(disc_group["params"]) == len(
        list(session.model.parameters())
    )
    assert vae_group["betas"] == (0.9, 0.999) and disc_group["betas"] == (0.4, 0.8)
    assert bool(disc_group["fused"]) == fused
    x = splits.train.batch(slice(0, 16), "cpu")
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    for step in (0, 2):
        trainer.train_step(session, x, session.context(step, 1), 4)
        factor = 0.5 * (1 + math.cos(math.pi * step / 4))  # each group's own rate, scheduled
        assert vae_group["lr"] == pytest.approx(0.002 * factor, rel=1e-12)
        assert disc_group["lr"] == pytest.approx(0.0003 * factor, rel=1e-12)
    after = session.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in after if "discriminator" in k)
    state = session.optimizer.state
    assert all(state[p]["step"].item() == 2 for p in disc_group["params"])


class Interrupt(Exception):
    pass


def _stop_after_first(epoch, rows):
    if epoch == 1:
        raise Interrupt


def test_resume_is_exact_with_the_discriminator_and_both_adam_groups(tmp_path, splits):
    cfg = tiny_config("model.name=factor_vae", *SMALL_D, "train.lr_schedule=cosine")
    full = vaelab.train(cfg, tmp_path / "full", splits=splits)
    with pytest.raises(Interrupt):
        vaelab.train(cfg, tmp_path / "cut", splits=splits, on_epoch_end=_stop_after_first)
    vaelab.resume(tmp_path / "cut", splits=splits)
    a, b = vaelab.load(full).state_dict(), vaelab.load(tmp_path / "cut").state_dict()
    assert any(k.startswith("discriminator.") for k in a)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    # Both groups' Adam state (the discriminator's too) and settings, bit for bit.
    states = [tmp_path / r / "state" / "train_state.safetensors" for r in ("full", "cut")]
    sa, sb = (load_file(p) for p in states)
    assert sa.keys() == sb.keys()
    n = len(list(vaelab.load(full).parameters()))
    names = {f"optim.{i}.{m}" for i in range(n) for m in ("step", "exp_avg", "exp_avg_sq")}
    assert {k for k in sa if k.startswith("optim.")} == names  # every parameter's, D's too
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k
    groups = []
    for p in states:
        with safe_open(p, framework="pt") as f:
            groups.append(json.loads(f.metadata()["param_groups"]))
    assert groups[0] == groups[1]
    assert [g["base_lr"] for g in groups[0]] == [1e-3, 1e-4]
    assert [g["betas"] for g in groups[0]] == [[0.9, 0.999], [0.5, 0.9]]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    rows = drop(read_metrics(full))
    assert rows == drop(read_metrics(tmp_path / "cut"))
    assert {"tc", "disc_loss", "disc_acc"} <= rows[-1].keys()
    assert all(math.isfinite(r["disc_loss"]) for r in rows)


def test_a_run_saved_before_groups_kept_their_base_rate_resumes(tmp_path, splits):
    """The resume state of runs trained before ``param_groups`` has no "base_lr": the group
    keeps the one the trainer gives it, and the run resumes as an uninterrupted one."""
    cfg = tiny_config("train.lr_schedule=cosine")
    full = vaelab.train(cfg, tmp_path / "full", splits=splits)
    with pytest.raises(Interrupt):
        vaelab.train(cfg, tmp_path / "old", splits=splits, on_epoch_end=_stop_after_first)
    path = tmp_path / "old" / "state" / "train_state.safetensors"
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    groups = json.loads(meta["param_groups"])
    meta["param_groups"] = json.dumps([{k: v for k, v in g.items() if k != "base_lr"}
                                       for g in groups])  # fmt: skip
    save_file(load_file(path), path, meta)
    vaelab.resume(tmp_path / "old", splits=splits)
    a, b = vaelab.load(full).state_dict(), vaelab.load(tmp_path / "old").state_dict()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


# -- what the config refuses ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("model.gamma=-1", "gamma"),
        ("model.gamma=inf", "gamma"),
        ("model.disc_layers=0", "disc_layers"),
        ("model.disc_width=0", "disc_width"),
        ("model.disc_lr=0", "disc_lr"),
        ("model.disc_betas=[0.5]", "disc_betas"),
        ("model.disc_betas=[0.5,1]", "disc_betas"),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_key(setting, key):
    with pytest.raises(ConfigError) as err:
        tiny_config("model.name=factor_vae", setting)
    message = str(err.value)
    assert f"'model.{key}'" in message and "\n" not in message, message


def test_torchrun_is_allowed_but_not_with_free_bits():
    MODELS["factor_vae"].check_run(tiny_config("model.name=factor_vae"), 2)
    with pytest.raises(ConfigError, match="model.free_bits"):
        MODELS["factor_vae"].check_run(
            tiny_config("model.name=factor_vae", "model.free_bits=0.5"), 2
        )


def test_defaults_follow_the_paper():
    cfg = tiny_config("model.name=factor_vae").model
    assert (cfg.disc_lr, cfg.disc_betas) == (1e-4, (0.5, 0.9))
    assert cfg.gamma == 35
    shipped = vaelab.load_config("shapes_factor_vae").model
    assert shipped.name == "factor_vae" and shipped.latent_dim == 10
