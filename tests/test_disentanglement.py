"""Disentanglement metrics on encoders whose answers are known, built straight from the factors:

(a) ``true``: one code dimension per factor (standardized, small noise), plus a constant
    (collapsed) dimension and a pure-noise dimension: every metric near its maximum;
(b) ``mixed``: the same five factors (plus three zeros) through an 8x8 Hadamard rotation, so
    every code dimension carries every factor with the same weight: all the information is
    there but no dimension belongs to any factor, so every disentanglement number falls to
    chance; ``rotated`` is a random (Haar) rotation, less extreme: MIG must still drop well
    below (a);
(c) ``noise``: codes that ignore the factors: accuracies at chance, MIG near 0.

DCI is checked on codes of the same kinds built from three small factors (``DCI_SIZES``): its
boosted trees cost one tree per class and round, too slow for these five.
"""

import math

import numpy as np
import pytest
import torch

from vaelab import disentanglement as dis
from vaelab.disentanglement import (
    beta_vae_score,
    dci,
    disentanglement_completeness,
    factor_vae_score,
    mig,
    mutual_information_gap,
    sample_codes,
    uniform_factor_sampler,
)

SIZES = (3, 6, 10, 8, 8)
CHANCE = 1 / len(SIZES)
SAMPLE = uniform_factor_sampler(SIZES)
# DCI's boosted trees grow one tree per class and round (100 rounds): its tests use three small
# factors (8 trees a round) and a few hundred points to stay within seconds.
DCI_SIZES = (2, 3, 4)


def standardized(factors):
    """Each factor as a zero-mean, unit-variance code (uniform discrete on 0..size-1)."""
    return standardized_as(factors, SIZES)


def standardized_as(factors, sizes):
    sizes = np.asarray(sizes)
    return (factors - (sizes - 1) / 2) / np.sqrt((sizes**2 - 1) / 12)


def hadamard(n):
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def true_encoder(seed=0):
    g = np.random.default_rng(seed)

    def represent(factors):
        n = len(factors)
        z = standardized(factors) + 0.05 * g.standard_normal((n, len(SIZES)))
        return np.concatenate([z, np.full((n, 1), 0.3), g.standard_normal((n, 1))], 1)

    return represent


def mixed_encoder(seed=0):
    g, h = np.random.default_rng(seed), hadamard(8)

    def represent(factors):
        z = np.concatenate([standardized(factors), np.zeros((len(factors), 3))], 1) @ h.T
        return z + 0.05 * g.standard_normal(z.shape)

    return represent


def rotated_encoder(seed=0):
    g = np.random.default_rng(seed)
    q, r = np.linalg.qr(g.standard_normal((len(SIZES), len(SIZES))))
    q *= np.sign(np.diag(r))  # Haar-distributed
    return lambda factors: standardized(factors) @ q.T


def noise_encoder(seed=0):
    g = np.random.default_rng(seed)
    return lambda factors: g.standard_normal((len(factors), 6))


ENCODERS = {
    "true": true_encoder,
    "mixed": mixed_encoder,
    "rotated": rotated_encoder,
    "noise": noise_encoder,
}


def full_grid(sizes):
    """Every factor combination exactly once: distinct factors are exactly independent."""
    return np.indices(sizes).reshape(len(sizes), -1).T


@pytest.fixture(scope="module")
def migs():
    out = {}
    for name, encoder in ENCODERS.items():
        codes, factors = sample_codes(encoder(), SAMPLE, SIZES, 10_000, rng=0)
        out[name] = mig(codes, factors, SIZES)
    return out


# ---------------------------------------------------------------------------------------------
# MIG


def test_mig_is_one_for_the_factors_themselves_and_drops_by_a_fifth_for_a_duplicate():
    factors = full_grid(SIZES)
    codes = factors.astype(float)
    assert mig(codes, factors, SIZES) == pytest.approx(1.0, abs=1e-9)
    # Factor 0 in two dimensions: its top two mutual informations tie, so its gap is 0.
    result = mutual_information_gap(np.concatenate([codes[:, :1], codes], 1), factors, SIZES)
    assert result["per_factor"] == pytest.approx([0.0, 1.0, 1.0, 1.0, 1.0], abs=1e-9)
    assert result["mig"] == pytest.approx(0.8, abs=1e-9)
    assert result["factor_entropy"] == pytest.approx(np.log(SIZES).tolist())


def test_mig_of_a_factor_with_more_values_than_bins_is_capped():
    # 40 orientations in 20 equal-width bins: two values a bin, I = log 20 of H = log 40.
    sizes = (40, 3)
    factors = full_grid(sizes)
    result = mutual_information_gap(factors.astype(float), factors, sizes, n_bins=20)
    assert result["per_factor"][0] == pytest.approx(math.log(20) / math.log(40), abs=1e-9)
    assert result["per_factor"][1] == pytest.approx(1.0, abs=1e-9)


def test_mig_on_constructed_encoders(migs):
    assert migs["true"] >= 0.95
    assert migs["mixed"] <= 0.05
    assert migs["rotated"] <= migs["true"] - 0.4
    assert migs["noise"] <= 0.02


def test_mig_leaves_out_a_constant_factor():
    factors = full_grid((1, 4, 5))
    result = mutual_information_gap(factors.astype(float), factors, (1, 4, 5))
    assert math.isnan(result["per_factor"][0])
    assert result["mig"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# beta-VAE and FactorVAE scores


@pytest.mark.parametrize("score", [beta_vae_score, factor_vae_score])
def test_scores_on_constructed_encoders(score):
    values = {name: score(ENCODERS[name](), SAMPLE, SIZES, rng=0) for name in ENCODERS}
    assert values["true"] >= 0.95
    assert values["mixed"] <= CHANCE + 0.1
    assert values["noise"] == pytest.approx(CHANCE, abs=0.07)


def test_factor_vae_score_does_not_depend_on_the_scale_of_each_dimension():
    # Without the division by the global std, dimension 2 (std 0.1) would have the smallest
    # within-batch variance for every factor, and factor 1's dimension (noise std 1.5) never.
    scales = np.array([1.0, 30.0, 0.1, 1.0, 1.0, 1.0, 1.0])
    encoder = true_encoder()
    scaled = factor_vae_score(lambda f: encoder(f) * scales, SAMPLE, SIZES, rng=0)
    assert scaled == factor_vae_score(true_encoder(), SAMPLE, SIZES, rng=0) == 1.0


def test_factor_vae_score_prunes_collapsed_dimensions():
    # The true encoder's constant dimension has zero variance: without pruning it would divide
    # by 0. With only collapsed dimensions there is nothing to vote with.
    collapsed = lambda factors: 1e-3 * standardized(factors)  # noqa: E731
    assert factor_vae_score(collapsed, SAMPLE, SIZES, rng=0, n_train=50, n_eval=50) == 0.0
    kept = factor_vae_score(collapsed, SAMPLE, SIZES, rng=0, n_train=50, n_eval=50, prune_std=0)
    assert kept == 1.0


def test_represent_is_called_in_chunks_without_changing_the_score(monkeypatch):
    seen = []

    def represent(factors):
        seen.append(len(factors))
        return standardized(factors) @ hadamard(8)[:5, :5].T

    kwargs = dict(rng=3, batch_size=16, n_train=20, n_eval=20)
    whole = beta_vae_score(represent, SAMPLE, SIZES, **kwargs)
    assert max(seen) == 2 * 16 * 20
    seen.clear()
    monkeypatch.setattr(dis, "MAX_ROWS", 100)
    assert beta_vae_score(represent, SAMPLE, SIZES, **kwargs) == whole
    assert max(seen) == 100


# ---------------------------------------------------------------------------------------------
# DCI


def dci_factors(n=300, seed=0):
    """n uniform combinations of DCI_SIZES and the generator that drew them."""
    g = np.random.default_rng(seed)
    return g.integers(0, DCI_SIZES, size=(n, len(DCI_SIZES))), g


def dci_split(codes, factors, n_train=200):
    """dci trained on the first n_train rows, tested on the rest."""
    return dci(codes[:n_train], factors[:n_train], codes[n_train:], factors[n_train:], DCI_SIZES)


@pytest.mark.parametrize("transform", ["identity", "monotone and shuffled"])
def test_dci_of_a_perfect_code_is_one(transform):
    # Logistic-regression weights (vaelab's importances before issue 17) scored the standardized
    # factors 0.96: a softmax spreads weight over every dimension. A tree splits on one.
    factors, _ = dci_factors()
    codes, order = factors.astype(float), np.arange(len(DCI_SIZES))
    if transform != "identity":
        order = np.array([2, 0, 1])  # dimension j carries factor order[j]
        codes = np.exp(2 * codes / np.asarray(DCI_SIZES))[:, order]
    result = dci_split(codes, factors)
    assert result["disentanglement"] >= 0.99
    assert result["completeness"] >= 0.99
    assert result["informativeness"] == result["informativeness_train"] == 1.0
    np.testing.assert_allclose(result["importance"], np.eye(len(DCI_SIZES))[order], atol=1e-6)


def test_dci_of_entangled_codes_is_low():
    factors, g = dci_factors()
    z = np.concatenate([standardized_as(factors, DCI_SIZES), np.zeros((len(factors), 1))], 1)
    # Every dimension carries every factor with the same weight: the information is all there,
    # but no dimension belongs to a factor.
    mixed = dci_split(z @ hadamard(4).T + 0.05 * g.standard_normal(z.shape), factors)
    assert mixed["disentanglement"] <= 0.4
    assert mixed["completeness"] <= 0.4
    assert mixed["informativeness"] >= 0.95
    noise = dci_split(g.standard_normal((len(factors), 4)), factors)
    assert noise["disentanglement"] <= 0.05
    assert noise["completeness"] <= 0.05
    chance = np.mean([1 / s for s in DCI_SIZES])
    assert noise["informativeness"] <= chance + 0.1


def test_dci_gives_no_importance_to_a_noise_or_a_collapsed_dimension():
    factors, g = dci_factors()
    n = len(factors)
    codes = np.concatenate([factors, g.standard_normal((n, 1)), np.full((n, 1), 0.3)], 1)
    result = dci_split(codes, factors)
    importance = np.asarray(result["importance"])
    # Every split on the factors' own dimensions separates their classes exactly; the noise
    # dimension has nothing left to explain, the constant one cannot be split.
    assert importance[3].max() <= 1e-6
    assert importance[4].tolist() == [0.0] * len(DCI_SIZES)
    assert result["per_dim_disentanglement"][4] == 0.0
    assert result["disentanglement"] >= 0.99
    assert result["completeness"] >= 0.99


def test_dci_completeness_sees_a_duplicated_dimension_and_disentanglement_does_not():
    factors, _ = dci_factors()
    codes = np.concatenate([factors[:, :1], factors], 1).astype(float)  # factor 0 twice, d = 4
    result = dci_split(codes, factors)
    importance = np.asarray(result["importance"])
    # The two copies tie at every split; the trees pick one at random each time, so factor 0's
    # importance is shared. With all of it on two of the d = 4 dimensions its completeness is at
    # least 1 - log 2 / log 4 = 1/2 (an even share).
    assert min(importance[0, 0], importance[1, 0]) >= 0.3
    assert importance[0, 0] + importance[1, 0] == pytest.approx(1.0)
    assert 0.5 - 1e-9 <= result["per_factor_completeness"][0] <= 0.6
    assert result["per_factor_completeness"][1:] == pytest.approx([1.0, 1.0], abs=1e-6)
    # Each of the two dimensions still serves only factor 0.
    assert result["disentanglement"] == pytest.approx(1.0, abs=1e-6)


def test_dci_is_disentanglement_libs_computation():
    """scikit-learn's GradientBoostingClassifier at its defaults, fitted here on the same split,
    and disentanglement_lib's scores of its importances, written out with numpy."""
    from sklearn.ensemble import GradientBoostingClassifier

    factors, g = dci_factors(450, seed=1)
    z = standardized_as(factors, DCI_SIZES)
    codes = np.stack(
        [z[:, 0] + 0.5 * z[:, 1], z[:, 1], z[:, 1], z[:, 2] - 0.7 * z[:, 0], g.normal(size=len(z))],
        1,
    ) + 0.2 * g.standard_normal((len(z), 5))
    codes[:, 2] = codes[:, 1]  # a tie at every split: the seed decides between them
    train, test = slice(0, 300), slice(300, None)
    importance = np.zeros((5, len(DCI_SIZES)))
    acc_train, acc_test = [], []
    for k in range(len(DCI_SIZES)):
        model = GradientBoostingClassifier(random_state=0).fit(codes[train], factors[train, k])
        importance[:, k] = model.feature_importances_
        acc_train.append(np.mean(model.predict(codes[train]) == factors[train, k]))
        acc_test.append(np.mean(model.predict(codes[test]) == factors[test, k]))

    def one_minus_entropy(r, base):  # of each column of r, normalized
        p = r / r.sum(0)
        return 1 + (p * np.log(np.where(p > 0, p, 1.0))).sum(0) / math.log(base)

    per_dim = one_minus_entropy(importance.T, len(DCI_SIZES))
    per_factor = one_minus_entropy(importance, 5)
    total = importance.sum()
    result = dci_split(codes, factors, 300)
    np.testing.assert_allclose(result["importance"], importance, rtol=1e-12, atol=1e-15)
    assert result["per_factor_accuracy"] == pytest.approx(acc_test)
    assert result["informativeness"] == pytest.approx(np.mean(acc_test))
    assert result["informativeness_train"] == pytest.approx(np.mean(acc_train))
    assert result["per_dim_disentanglement"] == pytest.approx(per_dim.tolist())
    assert result["per_factor_completeness"] == pytest.approx(per_factor.tolist())
    assert result["disentanglement"] == pytest.approx((per_dim * importance.sum(1)).sum() / total)
    # disentanglement_lib weights each factor by its share of the importance: 1/F here.
    assert result["completeness"] == pytest.approx((per_factor * importance.sum(0)).sum() / total)
    # Not a permutation: factors 1 and 2 each take importance from two dimensions.
    assert 0.3 <= result["disentanglement"] <= 0.9
    assert 0.3 <= result["completeness"] <= 0.9


def test_dci_leaves_out_a_factor_constant_in_the_train_split():
    factors, g = dci_factors()
    factors[:200, 0] = 0  # the test split still has both values
    codes = np.concatenate([factors, g.standard_normal((len(factors), 1))], 1)
    result = dci_split(codes, factors)
    assert np.asarray(result["importance"])[:, 0].tolist() == [0.0] * 4
    assert math.isnan(result["per_factor_completeness"][0])
    assert result["completeness"] == pytest.approx(np.mean(result["per_factor_completeness"][1:]))
    assert result["completeness"] >= 0.99
    # Predicted as the one value it took in training.
    assert result["per_factor_accuracy"][0] == pytest.approx(np.mean(factors[200:, 0] == 0))
    assert result["informativeness_train"] == 1.0


def test_disentanglement_completeness_formula():
    assert disentanglement_completeness(np.eye(3))["disentanglement"] == pytest.approx(1.0)
    assert disentanglement_completeness(np.eye(3))["completeness"] == pytest.approx(1.0)
    spread = disentanglement_completeness(np.ones((4, 3)))
    assert spread["disentanglement"] == pytest.approx(0.0)
    assert spread["completeness"] == pytest.approx(0.0)
    # Dimension 0 serves both factors (D_0 = 0), dimension 1 only factor 0 (D_1 = 1); equal
    # weights rho = (1/2, 1/2). Factor 0 is spread (1/3, 2/3), factor 1 lives in dimension 0.
    result = disentanglement_completeness(np.array([[0.5, 0.5], [1.0, 0.0]]))
    h = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    assert result["per_dim_disentanglement"] == pytest.approx([0.0, 1.0])
    assert result["disentanglement"] == pytest.approx(0.5)
    assert result["per_factor_completeness"] == pytest.approx([1 - h / math.log(2), 1.0])
    assert result["completeness"] == pytest.approx((2 - h / math.log(2)) / 2)


# ---------------------------------------------------------------------------------------------
# determinism and inputs


@pytest.mark.parametrize("score", [beta_vae_score, factor_vae_score])
def test_scores_are_deterministic_given_the_seed(score):
    def run(rng):
        seen = []
        noise = noise_encoder()

        def represent(factors):
            seen.append(factors.copy())
            return noise(factors)

        value = score(represent, SAMPLE, SIZES, rng=rng, n_train=200, n_eval=200)
        return value, np.concatenate(seen)

    value, rows = run(7)
    again, rows_again = run(7)
    assert again == value and np.array_equal(rows_again, rows)
    value, rows = run(np.random.default_rng(7))
    again, rows_again = run(np.random.default_rng(7))
    assert again == value and np.array_equal(rows_again, rows)
    # The seed is used: another one asks for other factor combinations.
    assert not np.array_equal(run(8)[1], rows)


def test_sample_codes_and_dci_are_deterministic(monkeypatch):
    a = sample_codes(true_encoder(), SAMPLE, SIZES, 500, rng=4)
    b = sample_codes(true_encoder(), SAMPLE, SIZES, 500, rng=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # The trees break ties between equally good splits at random; a duplicated dimension ties
    # at every split, so only the fixed seed makes two runs agree.
    factors, _ = dci_factors()
    codes = np.concatenate([factors[:, :1], factors], 1).astype(float)
    first = dci_split(codes, factors)
    assert dci_split(codes, factors) == first
    monkeypatch.setattr(dis, "GBT_SEED", dis.GBT_SEED + 1)
    assert dci_split(codes, factors)["importance"] != first["importance"]


def test_metrics_train_their_classifiers_under_no_grad():
    # Evaluation code runs under torch.no_grad(); the classifier must still learn.
    with torch.no_grad():
        assert beta_vae_score(true_encoder(), SAMPLE, SIZES, n_train=100, n_eval=100) >= 0.95


def test_inputs_are_validated():
    factors = SAMPLE(6, np.random.default_rng(0))
    codes = standardized(factors)
    with pytest.raises(ValueError, match="5 codes for 6 factor rows"):
        mig(codes[:5], factors, SIZES)
    with pytest.raises(ValueError, match=r"expected factors of shape \(N, 5\)"):
        mig(codes, factors[:, :4], SIZES)
    bad = factors.copy()
    bad[0, 2] = 10
    with pytest.raises(ValueError, match=r"factor 2 takes values .* outside \[0, 9\]"):
        mig(codes, bad, SIZES)
    with pytest.raises(ValueError, match="NaN"):
        mig(np.full_like(codes, np.nan), factors, SIZES)
    with pytest.raises(ValueError, match="n_bins"):
        mig(codes, factors, SIZES, n_bins=1)
    with pytest.raises(ValueError, match="train codes have 5 dimensions but test codes have 4"):
        dci(codes, factors, codes[:, :4], factors, SIZES)
    with pytest.raises(ValueError, match="3 codes for 4 factor rows"):
        dci(codes, factors, codes[:3], factors[:4], SIZES)
    with pytest.raises(ValueError, match="represent: 9 codes for 10 factor rows"):
        sample_codes(lambda f: np.zeros((len(f) - 1, 2)), SAMPLE, SIZES, 10)
    with pytest.raises(ValueError, match="sample_factors: factor 0 takes values"):
        beta_vae_score(true_encoder(), lambda n, rng: np.full((n, 5), 3), SIZES)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 2"):
        factor_vae_score(true_encoder(), SAMPLE, SIZES, batch_size=1)
    with pytest.raises(TypeError, match="rng"):
        beta_vae_score(true_encoder(), SAMPLE, SIZES, rng="seed")
