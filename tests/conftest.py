from __future__ import annotations

import numpy as np
import pytest
import torch

import vaelab  # (registers the models; trains the runs fixture)
from vaelab.config import RunConfig, load_config
from vaelab.data import ImageDataset, Splits


def tiny_splits(n_train: int = 64, n_val: int = 16, shape=(8, 8, 1), seed: int = 0) -> Splits:
    """Random uint8 images (N, H, W, C): enough to exercise every code path in milliseconds."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    val = rng.integers(0, 256, (n_val, *shape), dtype=np.uint8)
    return Splits(train=ImageDataset(train), val=ImageDataset(val))


def tiny_config(*overrides: str) -> RunConfig:
    base = [
        "model.widths=[4,8]",
        "model.latent_dim=2",
        "train.batch_size=16",
        "train.epochs=2",
        "train.progress=false",
    ]
    return load_config(overrides=[*base, *overrides])


def posterior_draw(model, x, seed: int, k: int = 1):
    """q(z|x) and the k samples of z (k, B, d) that ``model(x)`` drew after manual_seed(seed),
    to recompute a forward pass's terms by hand."""
    torch.manual_seed(seed)
    q = model.encode(x)
    return q, q.rsample(k)


@pytest.fixture
def splits() -> Splits:
    return tiny_splits()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A vae and a decoder_only run of one epoch on tiny data, and the data (per module)."""
    splits = tiny_splits()
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for name in ["vae", "decoder_only"]:
        cfg = tiny_config(f"model.name={name}", "train.epochs=1")
        made[name] = vaelab.train(cfg, out / name, splits=splits)
    return made, splits
