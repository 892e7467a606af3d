import gzip

import numpy as np
import pytest
import torch

from vaelab.config import load_config
from vaelab.data import DataError, ImageDataset, build, stratified_split
from vaelab.data.mnist5k import mnist5k_path


def test_mnist5k_is_read_from_the_installed_wheel():
    assert mnist5k_path().name == "mnist_5k.csv.gz"
    splits = build(load_config().data)
    assert len(splits.train) == 4500 and len(splits.val) == 500
    assert splits.train.shape == (1, 28, 28)
    # Classes balanced: 50 of each digit in val.
    assert np.bincount(splits.val.labels).tolist() == [50] * 10
    x = splits.train.batch(np.arange(8))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9  # real digits, scaled to [0, 1]


def test_split_is_seeded_and_disjoint():
    labels = np.repeat(np.arange(3), 20)
    a = stratified_split(labels, 0.25, seed=1)
    b = stratified_split(labels, 0.25, seed=1)
    c = stratified_split(labels, 0.25, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    assert not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 60
    assert np.bincount(labels[a[1]]).tolist() == [5, 5, 5]


def test_mnist5k_root_points_at_a_csv(tmp_path):
    rows = np.zeros((20, 785), dtype=np.int64)
    rows[:, :784] = np.arange(20)[:, None]
    rows[:, 784] = np.arange(20) % 2
    path = tmp_path / "digits.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    splits = build(load_config(overrides=[f"data.root={path}", "data.val_fraction=0.2"]).data)
    assert (len(splits.train), len(splits.val)) == (16, 4)


def test_bad_data_gives_clear_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="bad.csv': expected 785 columns"):
        build(load_config(overrides=[f"data.root={bad}"]).data)
    with pytest.raises(DataError, match="unknown data source 'cifar'"):
        build(load_config(overrides=["data.name=cifar"]).data)
    with pytest.raises(DataError, match="expected uint8"):
        ImageDataset(np.zeros((2, 4, 4, 1), dtype=np.float32))


@pytest.mark.parametrize("binarize", [False, True])
def test_device_images_give_the_batches_the_dataset_gives(binarize):
    from vaelab.data.base import DeviceImages, batch_source

    images = np.random.default_rng(0).integers(0, 256, (10, 5, 4, 3), np.uint8)
    dataset = ImageDataset(images, rows=np.arange(2, 10), binarize=binarize)
    on_device = DeviceImages(dataset, torch.device("cpu"))  # the same code a GPU runs
    index = torch.tensor([5, 0, 7])
    assert torch.equal(on_device.batch(index), dataset.batch(index))
    assert batch_source(dataset, torch.device("cpu")) is dataset  # only GPUs hold a copy
