"""Disentanglement metrics for codes of data with known discrete generative factors.

A pure module: numpy, torch and scikit-learn (DCI's trees) only, and no knowledge of images or
models. Two callables connect it to the data and the model:

- ``sample_factors(n, rng) -> (n, F) int``: n independent, uniformly random factor combinations
  (``uniform_factor_sampler(factor_sizes)`` builds one);
- ``represent(factors (n, F)) -> (n, d) float``: render those combinations and encode them to the
  model's posterior means. It is called on at most ``MAX_ROWS`` rows at a time.

Metrics (every one is deterministic given its ``rng``, an ``np.random.Generator`` or an int seed):

- ``mig`` / ``mutual_information_gap``: Mutual Information Gap (Chen et al. 2018) from codes and
  factors sampled once (``sample_codes``);
- ``beta_vae_score``: the linear-classifier accuracy of Higgins et al. (2017), chance 1/F;
- ``factor_vae_score``: the majority-vote accuracy of Kim & Mnih (2018), chance about 1/F;
- ``dci``: disentanglement, completeness, informativeness (Eastwood & Williams 2018) from
  gradient-boosted trees, as disentanglement_lib computes it.

The defaults are sized for seconds on a CPU with a cheap ``represent``. Every accuracy is
estimated from a finite number of points (its standard error is about sqrt(p(1-p)/n_eval),
0.02 at n_eval=500); larger ``n_train``/``n_eval`` reduce the variance and cost ``represent``
calls in proportion. disentanglement_lib (Locatello et al. 2019) uses 10,000 train and 5,000
eval points for both scores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SampleFactors = Callable[[int, np.random.Generator], np.ndarray]
Represent = Callable[[np.ndarray], np.ndarray]

# Rows handed to represent() at once: a beta-VAE point needs 2 * batch_size rows, so a whole
# evaluation is ~10^5 images; rendering them in one call would need gigabytes.
MAX_ROWS = 4096
# Kim & Mnih (2018) drop collapsed dimensions before the argmin; disentanglement_lib's threshold
# is a global standard deviation of 0.05, on the scale of posterior means under a N(0, I) prior.
PRUNE_STD = 0.05
# Weight of the L2 penalty (per sample, on standardized inputs) of the beta-VAE score's logistic
# regression: it makes the problem strictly convex, so separable data (a perfect code) has a
# finite optimum and the fit is unique.
L2 = 1e-4
LBFGS_ITERATIONS = 200
# DCI's gradient-boosted trees: disentanglement_lib's GradientBoostingClassifier() at
# scikit-learn's defaults, with the number of rounds (the default, 100) pinned here. The seed only
# breaks ties between equally good splits (no subsampling, every feature tried at every split),
# but without it two runs on codes with tied dimensions differ.
GBT_ROUNDS = 100
GBT_SEED = 0


def uniform_factor_sampler(factor_sizes: Sequence[int]) -> SampleFactors:
    """``sample_factors`` drawing each factor independently and uniformly from its values."""
    sizes = _check_sizes(factor_sizes)

    def sample_factors(n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, sizes, size=(n, len(sizes)))

    return sample_factors


def sample_codes(
    represent: Represent,
    sample_factors: SampleFactors,
    factor_sizes: Sequence[int],
    n: int,
    rng: np.random.Generator | int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random factor combinations and their codes: ``(codes (n, d), factors (n, F))``, the
    input of ``mig`` and ``dci``."""
    sizes = _check_sizes(factor_sizes)
    _check_count("n", n, 1)
    factors = _sample(sample_factors, n, _as_rng(rng), sizes)
    return _represent(represent, factors), factors


# ---------------------------------------------------------------------------------------------
# MIG


def mutual_information_gap(
    codes: np.ndarray, factors: np.ndarray, factor_sizes: Sequence[int], n_bins: int = 20
) -> dict[str, Any]:
    """Mutual Information Gap (Chen et al. 2018, eq. 6) with its parts.

    MIG = 1/F * sum_k (I(z_j(k); v_k) - max_{j != j(k)} I(z_j; v_k)) / H(v_k),
    j(k) = argmax_j I(z_j; v_k): for each factor, the gap between the two code dimensions that
    know most about it, as a fraction of what there is to know. Each code dimension is cut into
    ``n_bins`` equal-width bins over its observed range and the mutual information is the plug-in
    estimate from the empirical joint histogram, in nats, as in disentanglement_lib. H(v_k) is
    the empirical entropy of the factor in this sample (log of its size when uniform).

    The plug-in estimate is biased upward by about (n_bins - 1)(size - 1) / (2N) nats, so a code
    that ignores the factors scores slightly above 0; use N >> n_bins * max(factor_sizes). A
    factor with more values than ``n_bins`` cannot reach a gap of 1 (40 orientations in 20 bins
    lose log 2 nats).

    Returns ``mig``, ``per_factor`` (F,), ``mutual_information`` (d, F) and ``factor_entropy``
    (F,). A factor that is constant in the sample has no entropy to divide by: its entry is NaN
    and it is left out of the mean.
    """
    sizes = _check_sizes(factor_sizes)
    codes, factors = _check_data(codes, factors, sizes)
    _check_count("n_bins", n_bins, 2)
    binned = _discretize(codes, n_bins)  # (N, d) in [0, n_bins)
    d, n_factors = codes.shape[1], len(sizes)
    code_entropy = [_entropy(np.bincount(binned[:, j], minlength=n_bins)) for j in range(d)]
    mi = np.zeros((d, n_factors))
    factor_entropy = np.zeros(n_factors)
    for k, size in enumerate(sizes):
        factor_entropy[k] = _entropy(np.bincount(factors[:, k], minlength=size))
        for j in range(d):
            joint = np.bincount(binned[:, j] * size + factors[:, k], minlength=n_bins * size)
            # I(z; v) = H(z) + H(v) - H(z, v); clipped because rounding can make 0 slightly < 0.
            mi[j, k] = max(code_entropy[j] + factor_entropy[k] - _entropy(joint), 0.0)
    top = -np.sort(-mi, axis=0)  # (d, F), descending per factor
    second = top[1] if d > 1 else np.zeros(n_factors)
    informative = factor_entropy > 0
    if not informative.any():
        raise ValueError("mig: every factor is constant in this sample, so MIG is undefined")
    per_factor = np.full(n_factors, np.nan)
    per_factor[informative] = (top[0] - second)[informative] / factor_entropy[informative]
    return {
        "mig": float(per_factor[informative].mean()),
        "per_factor": per_factor.tolist(),
        "mutual_information": mi.tolist(),
        "factor_entropy": factor_entropy.tolist(),
    }


def mig(
    codes: np.ndarray, factors: np.ndarray, factor_sizes: Sequence[int], n_bins: int = 20
) -> float:
    """The Mutual Information Gap of ``codes`` (N, d) for ``factors`` (N, F), in [0, 1].

    See ``mutual_information_gap`` for the definition and the per-factor values.
    """
    return mutual_information_gap(codes, factors, factor_sizes, n_bins)["mig"]


# ---------------------------------------------------------------------------------------------
# beta-VAE score


def beta_vae_score(
    represent: Represent,
    sample_factors: SampleFactors,
    factor_sizes: Sequence[int],
    rng: np.random.Generator | int = 0,
    batch_size: int = 64,
    n_train: int = 1000,
    n_eval: int = 500,
) -> float:
    """The beta-VAE disentanglement score (Higgins et al. 2017, section 3), in [0, 1].

    One point: draw a factor k uniformly, then ``batch_size`` pairs of factor combinations that
    share the value of factor k (every other factor independent); the point's features are
    1/B * sum_b |z(v_1b) - z(v_2b)| and its label is k. A code that keeps factor k in its own
    dimensions has zero difference exactly there. A multinomial logistic regression (L2, on
    standardized features, full-batch L-BFGS) is trained on ``n_train`` points; the score is its
    accuracy on ``n_eval`` fresh points. Chance is 1/F.

    The score only asks whether k can be read linearly from the pattern of differences, so a
    randomly rotated code (every factor spread unequally over every dimension) can still score
    well (0.82 against 1.0 for the axis-aligned code, on 5 factors in the tests, where MIG falls
    from 1.0 to 0.25); MIG and DCI are the stricter tests.

    Defaults: each point costs 2 * batch_size represent() rows, 192,000 in all.
    """
    sizes = _check_sizes(factor_sizes)
    _check_count("batch_size", batch_size, 1)
    _check_count("n_train", n_train, 1)
    _check_count("n_eval", n_eval, 1)
    gen = _as_rng(rng)
    x_train, y_train = _beta_vae_points(represent, sample_factors, sizes, gen, batch_size, n_train)
    x_eval, y_eval = _beta_vae_points(represent, sample_factors, sizes, gen, batch_size, n_eval)
    x_train, x_eval = _standardize(x_train, x_eval)
    w, b = _fit_softmax(x_train, y_train, len(sizes))
    return float(np.mean((x_eval @ w + b).argmax(1) == y_eval))


def _beta_vae_points(
    represent: Represent,
    sample_factors: SampleFactors,
    sizes: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """n beta-VAE points: features (n, d) and labels (n,)."""
    labels = rng.integers(0, len(sizes), size=n)
    first = _sample(sample_factors, n * batch_size, rng, sizes).reshape(n, batch_size, -1)
    second = _sample(sample_factors, n * batch_size, rng, sizes).reshape(n, batch_size, -1)
    rows, cols = np.arange(n)[:, None], np.arange(batch_size)[None, :]
    second[rows, cols, labels[:, None]] = first[rows, cols, labels[:, None]]
    both = np.concatenate([first, second]).reshape(2 * n * batch_size, -1)
    codes = _represent(represent, both).reshape(2, n, batch_size, -1)
    return np.abs(codes[0] - codes[1]).mean(1), labels


# ---------------------------------------------------------------------------------------------
# FactorVAE score


def factor_vae_score(
    represent: Represent,
    sample_factors: SampleFactors,
    factor_sizes: Sequence[int],
    rng: np.random.Generator | int = 0,
    batch_size: int = 64,
    n_train: int = 1000,
    n_eval: int = 500,
    n_variance: int = 5000,
    prune_std: float = PRUNE_STD,
) -> float:
    """The FactorVAE disentanglement score (Kim & Mnih 2018, section 4), in [0, 1].

    Each code dimension is divided by its global standard deviation (from ``n_variance`` random
    samples), so that the dimension a factor lives in is found by its variance, not its scale.
    Dimensions with a global std below ``prune_std`` are collapsed (they carry nothing, and their
    near-zero variance would win every argmin) and are left out. One point: draw a factor k,
    fix it to one random value across ``batch_size`` otherwise random combinations; the point is
    argmin_j Var_batch(z_j / s_j) over the kept dimensions, with label k. The classifier is a
    majority vote: dimension j predicts the factor it was most often the argmin for on the
    ``n_train`` points (a dimension never seen predicts factor 0, as in disentanglement_lib);
    the score is its accuracy on ``n_eval`` fresh points. With every dimension collapsed the
    score is 0.

    Defaults: batch_size * (n_train + n_eval) + n_variance = 101,000 represent() rows.
    """
    sizes = _check_sizes(factor_sizes)
    _check_count("batch_size", batch_size, 2)  # a within-batch variance needs two samples
    _check_count("n_train", n_train, 1)
    _check_count("n_eval", n_eval, 1)
    _check_count("n_variance", n_variance, 2)
    if not prune_std >= 0:
        raise ValueError(f"prune_std: expected a number >= 0, got {prune_std}")
    gen = _as_rng(rng)
    global_std = _represent(represent, _sample(sample_factors, n_variance, gen, sizes)).std(
        0, ddof=1
    )
    active = np.flatnonzero(global_std >= prune_std)
    if active.size == 0:
        return 0.0
    scale = global_std[active]
    dims_train, k_train = _factor_vae_points(
        represent, sample_factors, sizes, gen, batch_size, n_train, active, scale
    )
    dims_eval, k_eval = _factor_vae_points(
        represent, sample_factors, sizes, gen, batch_size, n_eval, active, scale
    )
    votes = np.zeros((len(global_std), len(sizes)), dtype=np.int64)
    np.add.at(votes, (dims_train, k_train), 1)
    return float(np.mean(votes.argmax(1)[dims_eval] == k_eval))


def _factor_vae_points(
    represent: Represent,
    sample_factors: SampleFactors,
    sizes: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    n: int,
    active: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """n FactorVAE points: the argmin code dimension (n,) (indices into all dims) and labels."""
    labels = rng.integers(0, len(sizes), size=n)
    factors = _sample(sample_factors, n * batch_size, rng, sizes).reshape(n, batch_size, -1)
    rows = np.arange(n)
    # The fixed value is the first sample's: uniform, like every other draw.
    factors[rows, :, labels] = factors[rows, 0, labels][:, None]
    codes = _represent(represent, factors.reshape(n * batch_size, -1))
    codes = codes[:, active].reshape(n, batch_size, -1) / scale
    return active[codes.var(1, ddof=1).argmin(1)], labels


# ---------------------------------------------------------------------------------------------
# DCI


def dci(
    codes_train: np.ndarray,
    factors_train: np.ndarray,
    codes_test: np.ndarray,
    factors_test: np.ndarray,
    factor_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018, section 3),
    computed as disentanglement_lib computes them (Locatello et al. 2019, ``compute_dci``).

    For each factor k a classifier of v_k from the code is trained on the train split, and
    R[j, k] >= 0 is the importance of code dimension j to it. The paper reads R from lasso
    weights or random-forest importances; here, as in disentanglement_lib, each classifier is
    scikit-learn's ``GradientBoostingClassifier`` at its defaults (``GBT_ROUNDS`` = 100 rounds of
    depth-3 regression trees, one tree per class and round when there are more than two classes,
    learning rate 0.1) and R[:, k] is its ``feature_importances_``: the impurity decrease of the
    splits on each dimension, summed over the trees and normalized so that each column sums to 1.

    Why this classifier: published DCI numbers (disentanglement_lib and the papers that use it)
    are computed with it, and only the same classifier makes vaelab's comparable with them.
    A tree splits on one dimension at a time, so a factor that lives in one dimension takes all
    its importance there, through any monotone map (the true factors score D = C = 1, where the
    logistic-regression weights vaelab used before spread some importance over every dimension
    and scored them 0.96). The other side of axis-aligned splits: a factor spread over several
    dimensions by a rotation is read less accurately (lower informativeness) than a linear
    classifier would read it. The trees are seeded (``GBT_SEED``); disentanglement_lib leaves the
    seed unset, which only matters where two dimensions tie for a split.

    Disentanglement and completeness are the entropy scores of R (paper eqs. 1-3; see
    ``disentanglement_completeness``); a code dimension the trees never split on gets no weight,
    so it neither helps nor hurts. Informativeness is the mean test accuracy of the F classifiers
    (the paper's 1 - error; chance is about 1/size of each factor); ``informativeness_train`` is
    the train accuracy, which 100 rounds of trees push towards 1, so the gap measures overfitting.

    Cost: one tree per class and round, so a factor with 40 values grows 4,000 trees, and the
    time grows with the number of train codes and dimensions. On 2,000 train codes of 10
    dimensions with factors of sizes (3, 6, 40, 32, 32) (what ``vaelab evaluate`` passes on
    shapes) ``dci`` takes about 90 s of CPU on an AMD EPYC (Zen 3) core, where the logistic
    regressions took about 3 s; disentanglement_lib's 10,000 train codes would take about five
    times as long. The factors' classifiers grow in parallel threads, one per core.

    ``factor_sizes`` gives the number of classes of each factor; by default the largest value
    seen plus one. Returns ``disentanglement``, ``completeness``, ``informativeness``,
    ``informativeness_train``, ``per_dim_disentanglement`` (d,), ``per_factor_completeness``
    (F,), ``per_factor_accuracy`` (F,) and ``importance`` (d, F). A factor constant in the train
    split cannot be classified (scikit-learn needs two classes): it is predicted as that value,
    its importance is 0, and its completeness is NaN and left out of the mean.
    """
    codes_train = np.asarray(codes_train)
    codes_test = np.asarray(codes_test)
    factors_train = np.asarray(factors_train)
    factors_test = np.asarray(factors_test)
    if factor_sizes is None:
        if factors_train.ndim != 2 or factors_test.ndim != 2 or factors_train.size == 0:
            raise ValueError("dci: factors must be non-empty (N, F) arrays of integers")
        factor_sizes = np.maximum(factors_train.max(0), factors_test.max(0)) + 1
    sizes = _check_sizes(factor_sizes)
    codes_train, factors_train = _check_data(codes_train, factors_train, sizes, "train")
    codes_test, factors_test = _check_data(codes_test, factors_test, sizes, "test")
    if codes_train.shape[1] != codes_test.shape[1]:
        raise ValueError(
            f"dci: train codes have {codes_train.shape[1]} dimensions but test codes have "
            f"{codes_test.shape[1]}"
        )
    d, n_factors = codes_train.shape[1], len(sizes)
    if d < 2 or n_factors < 2:
        raise ValueError(
            f"dci: needs at least 2 code dimensions and 2 factors (entropies in base d and F), "
            f"got d={d}, F={n_factors}"
        )
    importance = np.zeros((d, n_factors))
    acc_train, acc_test = np.zeros(n_factors), np.zeros(n_factors)
    fitted = []
    for k in range(n_factors):
        y_train, y_test = factors_train[:, k], factors_test[:, k]
        if np.unique(y_train).size == 1:
            acc_train[k], acc_test[k] = 1.0, np.mean(y_test == y_train[0])
        else:
            fitted.append(k)
    # One factor's trees per core: scikit-learn grows a tree without the GIL, and each factor's
    # classifier is seeded on its own, so the result does not depend on the number of threads.
    with ThreadPoolExecutor(max_workers=max(1, min(len(fitted), os.cpu_count() or 1))) as pool:
        jobs = {k: pool.submit(_boosted_trees, codes_train, factors_train[:, k], codes_test,
                               factors_test[:, k]) for k in fitted}  # fmt: skip
        for k, job in jobs.items():
            importance[:, k], acc_train[k], acc_test[k] = job.result()
    scores = disentanglement_completeness(importance)
    return {
        "disentanglement": scores["disentanglement"],
        "completeness": scores["completeness"],
        "informativeness": float(acc_test.mean()),
        "informativeness_train": float(acc_train.mean()),
        "per_dim_disentanglement": scores["per_dim_disentanglement"],
        "per_factor_completeness": scores["per_factor_completeness"],
        "per_factor_accuracy": acc_test.tolist(),
        "importance": importance.tolist(),
    }


def disentanglement_completeness(importance: np.ndarray) -> dict[str, Any]:
    """DCI disentanglement and completeness (Eastwood & Williams 2018, eqs. 1-3) of an importance
    matrix R (d, F), R >= 0, R[j, k] = how much code dimension j matters for factor k.

    With P[j, k] = R[j, k] / sum_k R[j, k]:
      disentanglement = sum_j rho_j (1 - H_F(P[j, :])), rho_j = sum_k R[j, k] / sum R,
      completeness    = 1/F sum_k (1 - H_d(R[:, k] / sum_j R[j, k])),
    entropies in base F and base d: 1 when each dimension serves one factor (each factor lives in
    one dimension), 0 when importance is spread evenly. A dimension with no importance has
    rho_j = 0 (its per-dimension score is reported as 0); a factor with no importance is NaN and
    left out of the completeness mean. disentanglement_lib weights each factor's completeness
    by its share of sum R instead of 1/F; for columns that each sum to 1 (tree importances) the
    two agree.

    Exposed so that importances from another predictor (lasso, logistic-regression weights) can
    be scored the same way; ``dci`` calls it with gradient-boosted-tree importances.
    """
    r = np.asarray(importance, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise ValueError(
            f"importance: expected a (d, F) matrix with d >= 2 and F >= 2 (entropies in base d "
            f"and F), got shape {r.shape}"
        )
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError("importance: expected finite values >= 0")
    d, n_factors = r.shape
    row, column = r.sum(1), r.sum(0)
    used, fitted = row > 0, column > 0
    per_dim = np.zeros(d)
    per_dim[used] = 1.0 - _entropy_rows(r[used] / row[used, None]) / math.log(n_factors)
    disentanglement = float((per_dim * row).sum() / row.sum()) if used.any() else 0.0
    per_factor = np.full(n_factors, np.nan)
    per_factor[fitted] = 1.0 - _entropy_rows((r[:, fitted] / column[fitted]).T) / math.log(d)
    return {
        "disentanglement": disentanglement,
        "completeness": float(per_factor[fitted].mean()) if fitted.any() else 0.0,
        "per_dim_disentanglement": per_dim.tolist(),
        "per_factor_completeness": per_factor.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# helpers


def _boosted_trees(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """disentanglement_lib's DCI predictor (``compute_importance_gbt``): a gradient-boosted
    tree classifier of y from x at scikit-learn's defaults, seeded. Returns the importance of
    each column of x (d,), summing to 1 (all 0 when no tree splits), and the train and test
    accuracies."""
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(n_estimators=GBT_ROUNDS, random_state=GBT_SEED)
    model.fit(x_train, y_train)
    return (
        np.abs(model.feature_importances_),
        float(np.mean(model.predict(x_train) == y_train)),
        float(np.mean(model.predict(x_test) == y_test)),
    )


def _fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: weights (p, C) and biases (C,) minimising mean cross
    entropy + L2 * ||W||^2, by full-batch L-BFGS from zero. The problem is strictly convex, so the
    answer is unique and needs no seed."""
    xt = torch.from_numpy(x).double()
    yt = torch.from_numpy(y).long()
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=LBFGS_ITERATIONS,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + L2 * w.square().sum()
        loss.backward()
        return loss

    # One thread: at thousands x tens the synchronisation of a thread pool costs more than the
    # arithmetic, and 100x more when the cores are busy (measured: 7 s against 0.07 s a fit next
    # to a training run on 2 cores); it also makes the result independent of the machine.
    # LBFGS.step runs the closure under enable_grad, so callers may hold torch.no_grad().
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach().numpy(), b.detach().numpy()


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale both by the train statistics; a constant train column becomes 0 (dividing
    it by its ~0 std would turn rounding noise into a feature)."""
    mean, std = train.mean(0), train.std(0)
    constant = std <= 1e-12 * (1.0 + np.abs(mean))
    std = np.where(constant, 1.0, std)
    train, test = (train - mean) / std, (test - mean) / std
    train[:, constant], test[:, constant] = 0.0, 0.0
    return train, test


def _discretize(codes: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each entry in ``n_bins`` equal-width bins over its column's [min, max] (the
    maximum falls in the last bin, like np.histogram); a constant column is all bin 0."""
    low, high = codes.min(0), codes.max(0)
    width = np.where(high > low, high - low, 1.0)
    return np.clip(((codes - low) / width * n_bins).astype(np.int64), 0, n_bins - 1)


def _entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the empirical distribution given by ``counts``."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of ``p`` (rows sum to 1; 0 log 0 = 0)."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(1)


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng: expected a numpy Generator or an int seed, got {type(rng).__name__}")


def _check_count(name: str, value: int, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _check_sizes(factor_sizes: Sequence[int]) -> np.ndarray:
    sizes = np.asarray(factor_sizes)
    if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"factor_sizes: expected a non-empty list of integers, got {factor_sizes}")
    if (sizes < 1).any():
        raise ValueError(f"factor_sizes: every factor needs at least 1 value, got {factor_sizes}")
    return sizes.astype(np.int64)


def _check_factors(factors: np.ndarray, sizes: np.ndarray, what: str) -> np.ndarray:
    factors = np.asarray(factors)
    if factors.ndim != 2 or factors.shape[1] != len(sizes):
        raise ValueError(
            f"{what}: expected factors of shape (N, {len(sizes)}) for factor_sizes "
            f"{sizes.tolist()}, got {factors.shape}"
        )
    integer = np.issubdtype(factors.dtype, np.integer)
    if factors.size and not integer and not np.array_equal(factors, np.round(factors)):
        raise ValueError(f"{what}: factors must be integer indices, got {factors.dtype}")
    factors = factors.astype(np.int64)
    bad = (factors < 0) | (factors >= sizes)
    if bad.any():
        k = int(np.flatnonzero(bad.any(0))[0])
        raise ValueError(
            f"{what}: factor {k} takes values in [{factors[:, k].min()}, {factors[:, k].max()}], "
            f"outside [0, {sizes[k] - 1}] given by factor_sizes"
        )
    return factors


def _check_codes(codes: np.ndarray, n: int, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"{what}: expected codes of shape (N, d) with d >= 1, got {codes.shape}")
    if codes.shape[0] != n:
        raise ValueError(f"{what}: {codes.shape[0]} codes for {n} factor rows; they must match")
    codes = codes.astype(np.float64)
    if not np.isfinite(codes).all():
        raise ValueError(f"{what}: codes contain NaN or infinite values")
    return codes


def _check_data(
    codes: np.ndarray, factors: np.ndarray, sizes: np.ndarray, split: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (codes float64 (N, d), factors int64 (N, F)) with N >= 1."""
    what = f"{split} data" if split else "data"
    factors = _check_factors(factors, sizes, what)
    if factors.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    return _check_codes(codes, factors.shape[0], what), factors


def _sample(
    sample_factors: SampleFactors, n: int, rng: np.random.Generator, sizes: np.ndarray
) -> np.ndarray:
    """n factor combinations from the caller's sampler, checked."""
    factors = _check_factors(sample_factors(n, rng), sizes, "sample_factors")
    if factors.shape[0] != n:
        raise ValueError(f"sample_factors: asked for {n} rows, got {factors.shape[0]}")
    return factors.copy()  # the metrics overwrite columns; never the caller's array


def _represent(represent: Represent, factors: np.ndarray) -> np.ndarray:
    """Codes (n, d) of ``factors`` (n, F), at most MAX_ROWS rows per represent() call."""
    parts = []
    for start in range(0, len(factors), MAX_ROWS):
        chunk = factors[start : start + MAX_ROWS]
        codes = _check_codes(represent(chunk), len(chunk), "represent")
        if parts and codes.shape[1] != parts[0].shape[1]:
            raise ValueError(
                f"represent: returned {codes.shape[1]} code dimensions after "
                f"{parts[0].shape[1]}; it must return the same d every call"
            )
        parts.append(codes)
    return np.concatenate(parts)
