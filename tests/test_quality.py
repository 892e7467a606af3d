"""Sample quality (FID, KID in a classifier's feature space) and the post-hoc GMM sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import vaelab
from tests.conftest import tiny_config
from vaelab import quality, samplers
from vaelab.checkpoint import CheckpointError
from vaelab.cli import main
from vaelab.data import DataError, ImageDataset
from vaelab.report.draw import run_split


# -- the distances against independent computations -------------------------------------------
def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    # The formula as usually written: scipy's square root of the (non-symmetric) product.
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a.T), np.cov(b.T)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root)
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert quality.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_with_fewer_images_than_features_takes_the_same_value():
    # n, m < f (Inception's 2048 features, a few hundred images): the n x m route.
    rng = np.random.default_rng(5)
    a = rng.normal(size=(30, 50)) @ rng.normal(size=(50, 50)) * 0.3
    b = rng.normal(size=(40, 50)) + 0.2
    s_a, s_b = np.cov(a.T), np.cov(b.T)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * root)
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert quality.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_two_known_gaussians():
    # N(0, I) and N(m, 4 I) in f dims: |m|^2 + f (1 + 4 - 2 * 2) = |m|^2 + f.
    rng = np.random.default_rng(1)
    f, n = 3, 200_000
    a = rng.normal(size=(n, f))
    b = 2 * rng.normal(size=(n, f)) + np.array([1.0, 0.0, -1.0])
    assert quality.frechet_distance(a, b) == pytest.approx(2 + f, rel=0.01)


def test_kernel_distance_matches_an_explicit_loop():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 0.3

    def k(x, y):
        return (x @ y / 4 + 1) ** 3

    m = 30
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = quality.kernel_distance(a, b, subsets=3, size=30)  # every row: a permutation
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == pytest.approx(0, abs=1e-12)


def test_kernel_distance_is_unbiased_near_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    same, spread = quality.kernel_distance(a, b, subsets=50, size=200)
    shifted, _ = quality.kernel_distance(a, b + 0.5, subsets=50, size=200)
    assert abs(same) < 3 * spread
    assert shifted > 10 * spread


# -- the mixture sampler ------------------------------------------------------------------------
def _mixture() -> samplers.LatentMixture:
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    means = torch.tensor([[-3.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    chol = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.3, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    return samplers.LatentMixture(weights, means, chol, {"components": 2})


def test_mixture_log_prob_matches_scipy_and_its_samples_its_moments():
    from scipy.stats import multivariate_normal

    mix = _mixture()
    z = torch.randn(50, 2, dtype=torch.float64) * 2
    cov = mix.chol @ mix.chol.transpose(1, 2)
    dens = sum(
        mix.weights[k].item() * multivariate_normal(mix.means[k].numpy(), cov[k].numpy()).pdf(z)
        for k in range(2)
    )
    assert torch.allclose(mix.log_prob(z), torch.from_numpy(np.log(dens)), atol=1e-10)
    draws = mix.sample(100_000, seed=0)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    assert torch.allclose(draws.mean(0), mean, atol=0.03)
    assert torch.equal(mix.sample(5, seed=1), mix.sample(5, seed=1))
    # Temperature 0 gives the components' means only.
    assert set(map(tuple, mix.sample(200, 0.0, seed=2).tolist())) == set(
        map(tuple, mix.means.tolist())
    )


def test_fit_recovers_a_two_component_mixture_and_measures_it():
    rng = np.random.default_rng(4)
    codes = np.concatenate([rng.normal(-4, 1, (600, 2)), rng.normal(4, 0.5, (400, 2))])
    val = np.concatenate([rng.normal(-4, 1, (60, 2)), rng.normal(4, 0.5, (40, 2))])
    mix = samplers.fit(codes, 2, val=val)
    order = torch.argsort(mix.means[:, 0])
    assert torch.allclose(
        mix.means[order], torch.tensor([[-4.0, -4.0], [4.0, 4.0]], dtype=torch.float64), atol=0.15
    )
    assert torch.allclose(
        mix.weights[order], torch.tensor([0.6, 0.4], dtype=torch.float64), atol=0.02
    )
    assert mix.info["val_log_density"] > mix.info["val_log_density_prior"] + 5


def test_a_saved_mixture_loads_back_and_a_foreign_file_is_refused(tmp_path):
    mix = _mixture()
    mix.save(tmp_path / "gmm_2.safetensors")
    back = samplers.LatentMixture.load(tmp_path / "gmm_2.safetensors")
    assert torch.equal(back.chol, mix.chol) and back.info == mix.info
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="other.safetensors.*expected a vaelab sampler"):
        samplers.LatentMixture.load(tmp_path / "other.safetensors")


# -- the feature space --------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def short_training(monkeypatch):
    """The classifier trains 200 steps in these tests (the cache key follows the count)."""
    monkeypatch.setattr(quality, "CLASSIFIER_STEPS", 200)


def _labelled(n: int = 240, seed: int = 0) -> ImageDataset:
    """Images whose class is where a bright square sits (4 classes), 12x12 grey."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 40, (n, 12, 12, 1)).astype(np.uint8)
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 2)
        images[i, 6 * r : 6 * r + 6, 6 * c : 6 * c + 6] = 230
    return ImageDataset(images, labels)


def test_targets_prefer_attributes_then_factors_then_labels():
    data = _labelled(8)
    assert [(n, k) for n, _, k in quality.targets(data)] == [("label", 4)]
    both = ImageDataset(data.images, data.labels, factors=np.tile(np.array([[1, 2]]), (8, 1)),
                        factor_names=("a", "b"), factor_sizes=(2, 3))  # fmt: skip
    assert [(n, k) for n, _, k in quality.targets(both)] == [("a", 2), ("b", 3)]
    attrs = ImageDataset(data.images, data.labels, attributes={"Smiling": np.array([1, -1] * 4)})
    name, y, k = quality.targets(attrs)[0]
    assert (name, k) == ("Smiling", 2) and y.tolist() == [1, 0] * 4
    with pytest.raises(DataError, match="needs labels, attributes or factors"):
        quality.targets(ImageDataset(data.images))


def test_the_classifier_learns_the_labels_and_is_cached(tmp_path, monkeypatch):
    train, val = _labelled(240, 0), _labelled(80, 1)
    net, info = quality.classifier(train, val, cache=tmp_path)
    assert info["val_accuracy"] > 0.9
    cached = list((tmp_path / "classifiers").glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].stem == info["digest"]

    def never(*args, **kwargs):
        raise AssertionError("trained again although cached")

    monkeypatch.setattr(quality, "train_classifier", never)
    again, info2 = quality.classifier(train, val, cache=tmp_path)
    x = val.batch(slice(0, 16))
    assert np.array_equal(quality.features(net, x), quality.features(again, x))
    assert info2 == info
    # Other training images: another feature space, so another entry.
    monkeypatch.undo()
    quality.classifier(_labelled(240, 5), cache=tmp_path)
    assert len(list((tmp_path / "classifiers").glob("*.safetensors"))) == 2


def test_features_separate_the_classes_so_fid_sees_a_missing_class(tmp_path):
    train, val = _labelled(240, 0), _labelled(200, 1)
    net, _ = quality.classifier(train, cache=tmp_path)
    x = val.batch(slice(None))
    labels = val.labels
    real = quality.features(net, x)
    half = quality.features(net, x[torch.from_numpy(labels < 2)])  # two classes only
    other = quality.features(net, _labelled(200, 2).batch(slice(None)))
    assert quality.frechet_distance(other, real) < quality.frechet_distance(half, real) / 3


# -- a run: the sampler saved with it, the CLI --------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny conv VAE on the real mnist5k digits (the CLI rebuilds its data)."""
    out = tmp_path_factory.mktemp("quality")
    cfg = tiny_config("model.latent_dim=4", "train.epochs=1", "train.batch_size=256")
    return vaelab.train(cfg, out / "vae")


def test_gmm_sampler_is_saved_with_the_run_and_refitted_for_new_weights(run):
    model = vaelab.load(run)
    train, val = run_split(run, "train"), run_split(run)
    mix = samplers.gmm(run, model, train, val, 3)
    saved = run / "samplers" / "gmm_3.safetensors"
    assert saved.is_file() and mix.components == 3 and mix.means.shape == (3, 4)
    assert mix.info["step"] == vaelab.checkpoint.weights_metadata(run)["step"]
    stamp = saved.stat().st_mtime_ns
    assert torch.equal(samplers.gmm(run, model, train, val, 3).means, mix.means)
    assert saved.stat().st_mtime_ns == stamp  # reused, not fitted again
    # Weights of another step: fitted again.
    stale = samplers.LatentMixture(mix.weights, mix.means, mix.chol, {**mix.info, "step": -1})
    stale.save(saved)
    samplers.gmm(run, model, train, val, 3)
    assert samplers.LatentMixture.load(saved).info["step"] == mix.info["step"]
    # Saved before the prior was recorded: measured against N(0, I), which is this vae's prior.
    assert mix.info["prior"] == "StandardNormal"
    older = {k: v for k, v in mix.info.items() if k != "prior"}
    samplers.LatentMixture(mix.weights, mix.means, mix.chol, older).save(saved)
    assert samplers.saved_gmm(run, model, 3) is not None


def test_sample_with_the_gmm_sampler_from_the_cli(run, tmp_path):
    out = tmp_path / "gmm.png"
    assert main(["sample", str(run), "--sampler", "gmm", "--components", "4", "-n", "16",
                 "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size[0] > 0
    assert (run / "samplers" / "gmm_4.safetensors").is_file()
    prior = tmp_path / "prior.png"
    assert main(["sample", str(run), "-n", "16", "--out", str(prior)]) == 0
    assert np.asarray(Image.open(out)).tolist() != np.asarray(Image.open(prior)).tolist()


def test_quality_from_the_cli_writes_its_json(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    assert main(["quality", str(run), "--images", "200", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "FID (classifier)" in shown and "train images (floor)" in shown
    result = json.loads((run / "eval" / "quality_val.json").read_text())
    assert set(result["samplers"]) == {"prior", "gmm"}
    gmm = result["samplers"]["gmm"]
    assert gmm["components"] == 10 and gmm["val_log_density"] > gmm["val_log_density_prior"]
    assert result["num_images"] == 200 and result["classifier_heads"] == [["label", 10]]
    for entry in [*result["samplers"].values(), result["train_vs_held_out"]]:
        assert entry["fid_classifier"] >= 0 and np.isfinite(entry["kid_classifier"])
    # Real images are closer to held-out ones than a one-epoch model's samples are.
    floor = result["train_vs_held_out"]["fid_classifier"]
    assert floor < result["samplers"]["prior"]["fid_classifier"]
    assert list((tmp_path / "cache" / "classifiers").glob("*.safetensors"))


def test_gmm_is_refused_for_a_model_without_an_encoder(tmp_path, capsys):
    cfg = tiny_config("model.name=decoder_only", "train.epochs=1", "train.batch_size=256")
    made = vaelab.train(cfg, tmp_path / "dec")
    assert main(["sample", str(made), "--sampler", "gmm", "--out", str(tmp_path / "s.png")]) == 2
    assert "has no encoder, so there are no codes" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists() and not (made / "samplers").exists()


def test_the_report_shows_the_sample_quality_table(run, tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    result = quality.sample_quality(run, run_split(run, "train"), run_split(run), images=100,
                                    cache=tmp_path / "cache")  # fmt: skip
    page_path = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(page_path), "--quiet", "--iw-samples", "2"]) == 0
    page = page_path.read_text()
    assert "Sample quality (vaelab quality)" in page
    assert f"{result['samplers']['gmm']['fid_classifier']:.4g}" in page  # as the report rounds
    assert "not Inception FIDs" in page
