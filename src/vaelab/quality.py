"""Sample quality: how far a model's samples are from held-out images, in a feature space.

Two distances between the features of n samples and of n held-out images (docs/science.md):

- the Frechet distance (Heusel et al. 2017, "FID"): fit a Gaussian to each set of features,
  ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); biased upwards for small n, so compare
  models only at the same n, on the same held-out images;
- the kernel distance (Binkowski et al. 2018, "KID"): the unbiased estimate of the squared MMD
  with the cubic polynomial kernel k(a, b) = (a.b / f + 1)^3 (f features), averaged over
  random subsets, with its spread over them; unbiased, so it is near 0 when the sets match.

The feature space. FID as published is computed with the Inception-v3 network of TensorFlow;
vaelab never downloads weights and does not ship them, so it computes both distances in the
penultimate layer (``FEATURES`` values) of a small convolutional classifier that it trains on
the labels of the run's own training images (digits and Fashion-MNIST classes, CelebA's
attributes, the shapes factors), once, and caches in the data cache keyed by a digest of those
images and labels; every run trained on the same images is measured in the same space. The
numbers are named ``fid_classifier`` / ``kid_classifier``: they rank models on one data set,
and are not comparable with published Inception FIDs. Given the user's own copy of
pytorch-fid's port of those weights (``inception_weights``, ``vaelab.inception``), the same
images are also measured in Inception-v3's 2048 pool features: ``fid_inception`` /
``kid_inception``, with the weights file's sha256 in the result.

``sample_quality`` writes ``RUN/eval/quality_<split>.json``: per sampler (the prior, and the
run's post-hoc Gaussian mixture, ``vaelab.samplers``) the two distances, and the floor: the
distances between n training images and the n held-out ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from vaelab import inception, rundir, samplers
from vaelab.checkpoint import CheckpointError, _read_safetensors, load, weights_metadata
from vaelab.config import ConfigError
from vaelab.data import DataError, ImageDataset
from vaelab.data.cache import default_cache_dir
from vaelab.report.pictures import samples
from vaelab.rng import seeded

FEATURES = 128  # the classifier's penultimate width: the feature space's dimension
CLASSIFIER_STEPS = 1500  # Adam steps of 128 images (48 epochs of the demo's 4,000 digits)
CLASSIFIER_VERSION = 1  # part of the cache key: a change of the network or its training
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
SEED = 0


# -- the distances ------------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to features ``a`` (n, f) and ``b`` (m, f).

    tr (S_a S_b)^(1/2) is computed as tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): that matrix is
    symmetric positive semi-definite, so its square root's trace is the sum of the square roots
    of its eigenvalues (no non-symmetric matrix square root, no imaginary parts to drop).
    With fewer images than features (Inception's 2048), the same number without any f x f
    matrix: with the centred, scaled rows C_a (S_a = C_a^T C_a) and C_b, S_a S_b has the nonzero
    eigenvalues of (C_a C_b^T)(C_a C_b^T)^T, so the trace is the sum of the singular values of
    the n x m matrix C_a C_b^T."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"features: expected (n, f) and (m, f), n, m >= 2; got {a.shape}, {b.shape}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    if min(len(a), len(b)) < a.shape[1]:
        c_a, c_b = (a - mu_a) / np.sqrt(len(a) - 1), (b - mu_b) / np.sqrt(len(b) - 1)
        traces = (c_a**2).sum() + (c_b**2).sum()
        trace_root = np.linalg.svd(c_a @ c_b.T, compute_uv=False).sum()
        return float(((mu_a - mu_b) ** 2).sum() + traces - 2 * trace_root)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(s_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)


def kernel_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = KID_SUBSETS, size: int = KID_SUBSET_SIZE,
    seed: int = SEED,
) -> tuple[float, float]:  # fmt: skip
    """KID: the unbiased squared MMD between features ``a`` and ``b`` with the kernel
    (x.y / f + 1)^3, over ``subsets`` random subsets of min(size, n, m) rows of each (drawn
    without replacement); returns (mean, standard deviation over the subsets)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m = min(size, len(a), len(b))
    if m < 2:
        raise ValueError("kernel_distance: expected at least 2 rows in each set")
    rng = np.random.default_rng(seed)
    f = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / f + 1) ** 3, (y @ y.T / f + 1) ** 3, (x @ y.T / f + 1) ** 3)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# -- the feature space ---------------------------------------------------------------------------
def targets(dataset: ImageDataset) -> list[tuple[str, np.ndarray, int]]:
    """What the classifier learns to predict: (name, integer classes (N,), number of classes)
    per head. CelebA's binary attributes; else the shapes factors; else the class labels."""
    if dataset.attributes:
        return [(k, (v > 0).astype(np.int64), 2) for k, v in sorted(dataset.attributes.items())]
    factors = dataset.factors
    if factors is not None:
        sizes = dataset.factor_sizes or tuple(int(c.max()) + 1 for c in factors.T)
        names = dataset.factor_names or tuple(f"factor{i}" for i in range(factors.shape[1]))
        return [
            (n, factors[:, i].astype(np.int64), s)
            for i, (n, s) in enumerate(zip(names, sizes, strict=True))
        ]
    labels = dataset.labels
    if labels is not None and len(np.unique(labels)) >= 2:
        labels = np.asarray(labels, dtype=np.int64)
        return [("label", labels, int(labels.max()) + 1)]
    raise DataError(
        "sample quality in a classifier's feature space needs labels, attributes or factors "
        "in the training data; this data set has none"
    )


class Classifier(nn.Module):
    """Three stride-2 3x3 convolutions (32, 64, 128 channels, batch norm, ReLU), global average
    pooling to ``FEATURES`` values (the feature space), one linear head per target."""

    def __init__(self, channels: int, heads: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for width in (32, 64, FEATURES):
            layers += [nn.Conv2d(c, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(FEATURES, k) for k in heads)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.features(x)
        return [head(h) for head in self.heads]


def _digest(train: ImageDataset, heads: list[tuple[str, np.ndarray, int]]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((CLASSIFIER_VERSION, FEATURES, CLASSIFIER_STEPS, train.shape)).encode())
    for i in range(0, len(train), 4096):
        digest.update(np.ascontiguousarray(train.uint8(slice(i, i + 4096))).data)
    for name, y, k in heads:
        digest.update(repr((name, k)).encode())
        digest.update(np.ascontiguousarray(y).data)
    return digest.hexdigest()


def _accuracy(
    net: Classifier, data: ImageDataset, heads: list[tuple[str, np.ndarray, int]]
) -> float:
    net.eval()
    right = 0.0
    with torch.no_grad():
        for i in range(0, len(data), 500):
            logits = net(data.batch(slice(i, i + 500)))
            for out, (_, y, _) in zip(logits, heads, strict=True):
                right += float((out.argmax(1).numpy() == y[i : i + 500]).sum())
    return right / (len(data) * len(heads))


def train_classifier(
    train: ImageDataset, val: ImageDataset | None = None, progress: bool = False
) -> tuple[Classifier, dict[str, Any]]:
    """The classifier of ``train``'s images, trained with Adam (lr 1e-3) for
    ``CLASSIFIER_STEPS`` steps of 128 images on their targets (seeded), and its info (heads,
    accuracy on ``val``)."""
    heads = targets(train)
    val_heads = targets(val) if val is not None else None
    with seeded(SEED):
        net = Classifier(train.shape[0], [k for _, _, k in heads])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        n, batch = len(train), min(128, len(train))
        order = torch.randperm(n).numpy()
        net.train()
        for step in range(CLASSIFIER_STEPS):
            start = step * batch % (n - n % batch)
            if start == 0 and step:
                order = torch.randperm(n).numpy()
            idx = order[start : start + batch]
            logits = net(train.batch(idx))
            loss = sum(
                nn.functional.cross_entropy(out, torch.from_numpy(y[idx]))
                for out, (_, y, _) in zip(logits, heads, strict=True)
            )
            opt.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            if progress and (step + 1) % 500 == 0:
                print(f"  classifier step {step + 1}/{CLASSIFIER_STEPS}", flush=True)
    info: dict[str, Any] = {"heads": [[name, k] for name, _, k in heads], "images": n}
    if val is not None and val_heads is not None:
        info["val_accuracy"] = _accuracy(net, val, val_heads)
    return net.eval(), info


def classifier(
    train: ImageDataset, val: ImageDataset | None = None, cache: Path | None = None,
    progress: bool = False,
) -> tuple[Classifier, dict[str, Any]]:  # fmt: skip
    """The cached classifier of these training images (trained and cached on first use, in
    ``<cache>/classifiers/<digest>.safetensors``); its info holds ``digest`` and
    ``val_accuracy``."""
    heads = targets(train)
    key = _digest(train, heads)
    path = (cache or default_cache_dir()) / "classifiers" / f"{key}.safetensors"
    if path.is_file():
        try:
            tensors, metadata = _read_safetensors(path)
            info = json.loads(metadata["info"])
            net = Classifier(train.shape[0], [k for _, _, k in heads])
            net.load_state_dict(tensors)
            return net.eval(), info
        except (CheckpointError, KeyError, RuntimeError, json.JSONDecodeError):
            pass  # a damaged entry of vaelab's own cache: trained again and replaced below
    net, info = train_classifier(train, val, progress)
    info["digest"] = key
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    rundir.atomic_write(path, st_save(state, {"info": json.dumps(info)}))
    return net, info


@torch.no_grad()
def features(net: Classifier, images: Tensor, batch: int = 500) -> np.ndarray:
    """The feature vectors (n, FEATURES) of images (n, C, H, W) in [0, 1]."""
    net.eval()
    out = [net.features(images[i : i + batch].float()) for i in range(0, len(images), batch)]
    return torch.cat(out).double().numpy()


# -- a run's sample quality ---------------------------------------------------------------------
def sample_quality(
    run: str | Path,
    train: ImageDataset,
    held_out: ImageDataset,
    split: str = "val",
    images: int | None = None,
    components: int = samplers.COMPONENTS,
    cache: Path | None = None,
    progress: bool = False,
    inception_weights: str | Path | inception.Weights | None = None,
) -> dict[str, Any]:
    """FID and KID in the classifier's feature space between ``images`` samples (default: as
    many as ``held_out`` has) and as many held-out images, for the prior and (models with an
    encoder) the run's Gaussian-mixture sampler; written to ``RUN/eval/quality_<split>.json``.
    With ``inception_weights`` (the user's copy of pytorch-fid's Inception-v3 weights,
    ``vaelab.inception``; its path, or ``inception.open_weights`` of it to measure several runs)
    also ``fid_inception`` and ``kid_inception`` of the same images."""
    weights = inception_weights
    if weights is not None and not isinstance(weights, inception.Weights):
        weights = inception.open_weights(weights)  # before any work: a bad file is one line
    model = load(run)
    n = len(held_out) if images is None else images
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"--images: expected an integer >= 2, got {n!r}")
    if n > len(held_out) or n > len(train):
        raise ConfigError(
            f"--images: expected at most the {min(len(held_out), len(train))} images of the "
            f"held-out and training splits, got {n}"
        )
    start = time.perf_counter()
    net, info = classifier(train, held_out, cache, progress)

    def measure(x: Tensor, what: str, real: bool = False) -> dict[str, np.ndarray]:
        """The features of images ``x`` in each feature space (the Inception features of real
        images computed once for every run of a ``vaelab quality`` call: ``Weights``)."""
        spaces = {"classifier": features(net, x)}
        if weights is not None:
            if progress:
                print(f"  Inception features of {len(x)} {what}", flush=True)
            spaces["inception"] = weights.features(x, remember=real)
        return spaces

    spread = np.linspace(0, len(held_out) - 1, n).round().astype(np.int64)
    real = measure(held_out.batch(spread), f"{split} images", real=True)
    pick = np.random.default_rng(SEED).choice(len(train), n, replace=False)
    floor = measure(train.batch(np.sort(pick)), "training images", real=True)
    result: dict[str, Any] = {
        "feature_space": f"classifier {info.get('digest', '')[:12]} ({FEATURES} features)",
        "classifier_heads": info["heads"],
        "split": split,
        "num_images": n,
        "step": weights_metadata(run).get("step"),
        "train_vs_held_out": _distances(floor, real),
        "samplers": {},
    }
    if weights is not None:
        result["inception_weights"] = {
            "file": weights.file,
            "sha256": weights.sha256,
            "features": inception.FEATURES,
        }
    # a discrete latent (vq_vae): "prior" is the code prior fitted to its codes, and no gmm
    kinds = ["prior", "gmm"] if model.has_encoder and model.continuous_latent else ["prior"]
    for kind in kinds:
        mixture = samplers.latent_sampler(run, model, kind, train, held_out, components)
        # a conditional model's samples: conditions drawn from the held-out images
        drawn = samples(model, n, 1.0, SEED, mixture, held_out)
        fake = measure(drawn, f"{kind} samples")
        entry = _distances(fake, real)
        if isinstance(mixture, samplers.LatentMixture):
            entry["components"] = mixture.components
        if mixture is not None:  # how well it fits the val codes (samplers.fit, fit_code_prior)
            entry.update({k: v for k, v in mixture.info.items() if k.startswith("val_")})
        result["samplers"][kind] = entry
    result["seconds"] = time.perf_counter() - start
    rundir.atomic_write(
        Path(run) / rundir.EVAL / f"quality_{split}.json", json.dumps(result, indent=2) + "\n"
    )
    return result


# The result's names per feature space: FID, KID, KID's spread over the subsets.
NAMES = {
    "classifier": ("fid_classifier", "kid_classifier", "kid_std"),
    "inception": ("fid_inception", "kid_inception", "kid_inception_std"),
}


def _distances(fake: dict[str, np.ndarray], real: dict[str, np.ndarray]) -> dict[str, float]:
    """FID and KID in each feature space; KID over subsets of at most half the images, so that
    they differ and its spread says how much the estimate moves with the images drawn."""
    out: dict[str, float] = {}
    for space, (fid, kid, std) in NAMES.items():
        if space in real:
            a, b = fake[space], real[space]
            out[fid] = frechet_distance(a, b)
            out[kid], out[std] = kernel_distance(a, b, size=min(KID_SUBSET_SIZE, len(b) // 2))
    return out


def quality_table(result: dict[str, Any]) -> str:
    """The numbers of ``sample_quality``, one sampler a line (and the Inception columns when
    the result has them)."""
    rows = {**result["samplers"], "train images (floor)": result["train_vs_held_out"]}
    spaces = [s for s in NAMES if NAMES[s][0] in result["train_vs_held_out"]]
    label = {"classifier": "classifier", "inception": "Inception"}
    lines = [f"{'':<22}" + "".join(f"{f'FID ({label[s]})':>18}{f'KID ({label[s]})':>24}"
                                   for s in spaces)]  # fmt: skip
    for name, d in rows.items():
        line = f"{name:<22}"
        for space in spaces:
            fid, kid, std = NAMES[space]
            line += f"{d[fid]:>18.3f}{f'{d[kid]:.4f} +- {d[std]:.4f}':>24}"
        lines.append(line)
    lines.append(
        f"{result['num_images']} samples against {result['num_images']} {result['split']} "
        f"images, in the feature space of {result['feature_space']}"
    )
    weights = result.get("inception_weights")
    if weights:
        published = weights["sha256"].startswith(inception.PUBLISHED_SHA256_PREFIX)
        lines.append(
            f"and of Inception-v3 ({weights['file']}, sha256 {weights['sha256'][:12]}"
            + (")" if published else f": not {inception.WEIGHTS_NAME}, so not the standard FID)")
        )
    return "\n".join(lines)


__all__ = [
    "Classifier",
    "classifier",
    "features",
    "frechet_distance",
    "kernel_distance",
    "quality_table",
    "sample_quality",
    "targets",
]
