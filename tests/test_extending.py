"""The contract between models, the trainer and evaluation, as a user extends it: a variant
defined here, in a test file, through the public API only; one evaluation pass for validation
and ``vaelab evaluate``; every registered model saved, loaded and evaluated."""

import json
from dataclasses import dataclass

import pytest
import torch

import vaelab
from tests.conftest import tiny_config, tiny_splits
from vaelab import metrics
from vaelab.config import MODEL_CONFIGS, ModelConfig
from vaelab.evaluate import evaluate, evaluate_model
from vaelab.models import MODELS, VAE, ModelOutput, StepContext, register
from vaelab.report.figures import panels
from vaelab.report.html import write_report


@dataclass(frozen=True)
class TCConfig(ModelConfig):
    name: str = "test_tc_vae"
    tc_weight: float = 0.5  # a setting of the user's own


@register("test_tc_vae", TCConfig)
class TCVAE(VAE):
    """A user's variant: the VAE plus a made-up term ``tc`` (the squared posterior mean), weighted
    into the loss by its own config key."""

    def forward(self, x: torch.Tensor, ctx: StepContext | None = None) -> ModelOutput:
        out = super().forward(x, ctx)
        tc = out.posterior.mu.square().sum(-1)
        return ModelOutput(
            loss=out.loss + self.cfg.tc_weight * tc,
            elbo=out.elbo,
            terms={**out.terms, "tc": tc},
            posterior=out.posterior,
        )


@pytest.fixture(scope="module")
def data():
    return tiny_splits(n_train=64, n_val=40)


def test_a_variant_defined_in_a_test_file_trains_resumes_loads_evaluates_and_reports(tmp_path):
    # The embedded digits, as the report rebuilds a run's data from its config.
    fast = ["model.net=mlp", "model.widths=[32]", "model.latent_dim=4", "train.batch_size=500"]
    cfg = tiny_config(*fast, "model.name=test_tc_vae", "model.tc_weight=2", "train.epochs=1")
    data = vaelab.data.build(cfg.data, progress=False)
    run = vaelab.train(cfg, tmp_path / "tc", splits=data)
    vaelab.resume(run, ["train.epochs=2"], splits=data)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2]
    assert all(isinstance(r["tc"], float) and r["tc"] >= 0 for r in rows)
    assert list(rows[-1])[:6] == ["split", "epoch", "step", "loss", "recon", "kl"]
    assert ("tc", "tc") in panels(rows)  # its own panel in curves.png

    model = vaelab.load(run)
    assert isinstance(model, TCVAE) and model.cfg.tc_weight == 2
    result = evaluate(run, "val", iw_samples=3, progress=False, splits=data)
    assert result["tc"] == pytest.approx(rows[-1]["tc"], rel=1e-6)
    assert result["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-6)

    page = write_report([run], tmp_path / "report.html").read_text()
    assert "tc (a term of the model)" in page
    assert page.count("<img") >= 1


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_the_last_validation_row_is_what_evaluate_writes(tmp_path, data, precision):
    cfg = tiny_config("train.epochs=2", f"train.precision={precision}")
    run = vaelab.train(cfg, tmp_path / "vae", splits=data)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["split"] == "val"
    evaluate(run, "val", iw_samples=5, progress=False, splits=data)
    saved = json.loads((run / "eval" / "val.json").read_text())
    for key in ("loss", "elbo_nats", "bpd", "recon", "kl"):
        assert saved[key] == pytest.approx(last[key], rel=1e-6, abs=0), key


def test_sigma_vae_scores_one_fixed_model_whatever_the_importance_chunks(
    tmp_path, data, monkeypatch
):
    run = vaelab.train(
        tiny_config("model.name=sigma_vae", "train.epochs=1"), tmp_path / "s", splits=data
    )
    model = vaelab.load(run)
    fitted = model.likelihood.sigma2.item()
    assert fitted != 1.0  # fitted on the training data and saved with the weights
    small = evaluate_model(model, data.val, iw_samples=4, progress=False)
    monkeypatch.setattr(metrics, "MAX_ELEMENTS", 64 * 3)  # importance samples in chunks of 3
    large = evaluate_model(model, data.val, iw_samples=40, progress=False)
    for key in ("elbo_nats", "recon", "kl", "sigma2"):
        assert small[key] == large[key], key
    assert small["sigma2"] == pytest.approx(fitted)
    assert model.likelihood.sigma2.item() == fitted


# cvae needs labelled data and vq_vae a latent its code size divides, and has no IS estimate:
# tests/test_every_model.py covers both (and these) at their own settings.
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"cvae", "vq_vae"}))
def test_every_registered_model_saves_loads_and_evaluates(tmp_path, data, name):
    run = vaelab.train(
        tiny_config(f"model.name={name}", "train.epochs=1"), tmp_path / name, splits=data
    )
    model = vaelab.load(run)
    assert type(model) is MODELS[name]
    torch.manual_seed(0)
    x = data.val.batch(slice(0, 4), "cpu")
    before = model(x)
    again = vaelab.load(run)
    torch.manual_seed(0)
    after = again(x)
    torch.testing.assert_close(before.elbo, after.elbo)
    result = evaluate(run, "val", iw_samples=2, progress=False, splits=data)
    assert set(result) >= {"elbo_nats", "bpd", "iw_nll_nats", "recon", "loss", "num_images"}
    assert result["num_images"] == 40


def test_register_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="GenerativeModel"):
        register("test_not_a_model")(dict)
    with pytest.raises(TypeError, match="ModelConfig"):
        register("test_bad_config", dict)
    with pytest.raises(ValueError, match="registered twice"):

        @register("vae")
        class Other(VAE):
            pass


def test_a_term_may_not_take_a_row_key(data):
    @register("test_bad_term")
    class BadTerm(VAE):
        def forward(self, x, ctx=None):
            out = super().forward(x, ctx)
            return ModelOutput(out.loss, out.elbo, {**out.terms, "epoch": out.loss})

    @register("test_metric_clash")
    class Clash(VAE):
        def forward(self, x, ctx=None):
            out = super().forward(x, ctx)
            return ModelOutput(out.loss, out.elbo, {**out.terms, "psnr": out.loss}, out.posterior)

    try:
        model = BadTerm(tiny_config().model, data.val.shape)
        with pytest.raises(ValueError, match="'epoch'.*reserved"):
            metrics.evaluation_pass(model, data.val)
        clash = Clash(tiny_config().model, data.val.shape)
        metrics.evaluation_pass(clash, data.val)  # validation: the terms alone are fine
        with pytest.raises(ValueError, match="metric 'reconstruction' returns 'psnr'"):
            evaluate_model(clash, data.val, iw_samples=1, progress=False)
    finally:
        for name in ("test_bad_term", "test_metric_clash"):
            del MODELS[name], MODEL_CONFIGS[name]


def test_training_leaves_the_callers_random_generator_as_it_was(tmp_path, data):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    vaelab.train(tiny_config("train.epochs=1"), tmp_path / "r", splits=data)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_sigma_vae_run_saved_without_its_variance_says_why_it_cannot_load(tmp_path, data):
    from safetensors.torch import load_file, save_file

    from vaelab.checkpoint import CheckpointError

    run = vaelab.train(
        tiny_config("model.name=sigma_vae", "train.epochs=1"), tmp_path / "s", splits=data
    )
    path = run / "model.safetensors"
    with open(path, "rb") as f:
        from safetensors import safe_open

        metadata = safe_open(f.name, "pt").metadata()
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("likelihood.")}
    save_file(tensors, path, metadata=metadata)  # as a run from before issue 14 was saved
    with pytest.raises(CheckpointError, match="before vaelab kept sigma_vae's fitted decoder"):
        vaelab.load(run)
