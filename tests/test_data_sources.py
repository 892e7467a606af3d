"""CelebA, image folders, IDX files and the preprocessing cache, on fixtures built here."""

import gzip
import logging
import os

import numpy as np
import pytest
from PIL import Image

from vaelab import data
from vaelab.config import load_config
from vaelab.data import DataError, cache, idx
from vaelab.data.synthetic import celeba_name, write_images


def config(root, *overrides, name="celeba", cache_dir=None):
    cache_dir = cache_dir or root.parent / "cache"
    return load_config(
        overrides=[f"data.name={name}", f"data.root={root}", f"data.cache_dir={cache_dir}",
                   *overrides]
    ).data  # fmt: skip


def make_celeba(root, numbers, listed=None, layout="official"):
    base = root / "celeba" if layout == "torchvision" else root
    write_images(base / "img_align_celeba", [celeba_name(n) for n in numbers])
    if listed is not None:
        lines = [f"{celeba_name(n)} {split}\n" for n, split in listed]
        (base / "list_eval_partition.txt").write_text("".join(lines))
    return base


# Numbers 1-10 train, 162771-162774 valid, 182638-182640 test (the official boundaries).
TRAIN, VALID, TEST = list(range(1, 11)), list(range(162771, 162775)), list(range(182638, 182641))
PRESENT = TRAIN + VALID + TEST


def partition(missing=()):
    listed = [(n, 0) for n in TRAIN] + [(n, 1) for n in VALID] + [(n, 2) for n in TEST]
    return listed + [(n, 0) for n in missing]


@pytest.mark.parametrize("layout", ["official", "torchvision"])
def test_celeba_layouts_with_missing_images(tmp_path, caplog, layout):
    root = tmp_path / "CelebA"
    make_celeba(root, PRESENT, partition(missing=range(11, 31)), layout=layout)
    with caplog.at_level(logging.INFO, logger="vaelab"):
        splits = data.build(config(root), progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 3)
    assert splits.train.shape == (3, 64, 64)
    assert "lists 20 images that are not in" in caplog.text
    x = splits.val.batch(slice(0, 4))
    assert x.shape == (4, 3, 64, 64) and x.min() >= 0 and x.max() <= 1


def test_celeba_preprocessing_is_centre_crop_then_resize(tmp_path):
    root = tmp_path / "CelebA"
    make_celeba(root, [1, 2], [(1, 0), (2, 1)])
    splits = data.build(config(root, "data.size=32"), progress=False)
    got = splits.train.uint8(slice(0, 1))[0].astype(float)
    with Image.open(root / "img_align_celeba" / "000001.jpg") as img:
        left, top = (178 - 148) // 2, (218 - 148) // 2
        ref = img.crop((left, top, left + 148, top + 148)).resize((32, 32), Image.LANCZOS)
    assert np.abs(got - np.asarray(ref, float)).mean() < 4  # draft decoding: close, not exact
    assert data.build(config(root, "data.size=128"), progress=False).train.shape == (3, 128, 128)


def test_celeba_without_partition_file_splits_by_number(tmp_path, caplog):
    root = tmp_path / "CelebA"
    make_celeba(root, PRESENT)
    with caplog.at_level(logging.INFO, logger="vaelab"):
        splits = data.build(config(root), progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 3)
    assert "using the official split by file number" in caplog.text


def test_celeba_with_only_train_images_holds_out_validation(tmp_path, caplog):
    root = tmp_path / "CelebA"
    listed = [(n, 0) for n in range(1, 41)] + [(n, 1) for n in VALID] + [(n, 2) for n in TEST]
    make_celeba(root, range(1, 41), listed)  # the valid and test images are all missing
    with caplog.at_level(logging.INFO, logger="vaelab"):
        splits = data.build(config(root, "data.val_fraction=0.25"), progress=False)
    assert len(splits.val) > 0 and len(splits.train) + len(splits.val) == 40
    assert "holding out" in caplog.text


def test_celeba_attributes_and_identities(tmp_path):
    root = tmp_path / "CelebA"
    make_celeba(root, [1, 2, 3], [(1, 0), (2, 0), (3, 1)])
    (root / "list_attr_celeba.txt").write_text(
        "3\nSmiling Young\n000001.jpg 1 -1\n000002.jpg -1 -1\n000003.jpg 1 1\n"
    )
    (root / "identity_CelebA.txt").write_text("000001.jpg 7\n000002.jpg 7\n000003.jpg 9\n")
    splits = data.build(config(root), progress=False)
    assert splits.train.attributes["Smiling"].tolist() == [1, -1]
    assert splits.val.attributes["Young"].tolist() == [1]
    assert splits.train.labels.tolist() == [7, 7] and splits.val.labels.tolist() == [9]


def test_bad_files_are_skipped_counted_and_listed(tmp_path, caplog):
    root = tmp_path / "CelebA"
    make_celeba(root, range(1, 9), [(n, 0 if n < 7 else 1) for n in range(1, 9)])
    folder = root / "img_align_celeba"
    good = (folder / "000001.jpg").read_bytes()
    (folder / "000002.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "000003.jpg").write_bytes(good[:200] + os.urandom(3000))  # corrupt
    (folder / "000004.jpg").write_text("this is not an image\n")  # a text file named .jpg
    Image.new("L", (178, 218), 128).save(folder / "000005.png")  # grey PNG among RGB JPEGs
    with caplog.at_level(logging.INFO, logger="vaelab"):
        splits = data.build(config(root), progress=False)
    skipped = {s["file"] for s in splits.info["skipped"]}
    assert skipped == {"000002.jpg", "000003.jpg", "000004.jpg"}
    assert splits.info["count"] == 6  # 5 good JPEGs and the grey PNG, turned RGB
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.message
    ]
    assert len(warnings) == 1 and "000004.jpg" in warnings[0].message
    assert len(splits.train) + len(splits.val) == 5  # the PNG is not in the partition file


def test_wrong_roots_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.build(config(tmp_path / "nowhere"), progress=False)
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="expected CelebA's official layout") as err:
        data.build(config(tmp_path / "wrong"), progress=False)
    assert "\n" not in str(err.value)
    (tmp_path / "empty" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        data.build(config(tmp_path / "empty"), progress=False)
    with pytest.raises(DataError, match="no image files"):
        data.build(config(tmp_path / "empty", name="folder"), progress=False)
    with pytest.raises(DataError, match="needs data.root"):
        data.build(load_config(overrides=["data.name=folder"]).data, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_text("not an image")
    (broken / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="none of its 2 image files could be read"):
        data.build(config(broken, name="folder"), progress=False)


def test_folder_of_mixed_images(tmp_path):
    root = tmp_path / "pics"
    write_images(root, ["a.jpg", "sub/b.JPEG", "sub/deeper/c.png"], size=(50, 30))
    write_images(root, ["d.webp", "e.bmp"], size=(20, 40))
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(root / "f.png")  # fully transparent
    Image.new("L", (33, 33), 10).save(root / "g.png")
    (root / "notes.txt").write_text("ignored: not an image extension")
    splits = data.build(config(root, "data.size=16", name="folder"), progress=False)
    assert len(splits.train) + len(splits.val) == 7 and len(splits.val) >= 1
    assert splits.train.shape == (3, 16, 16)
    names = splits.info["images"]
    rgba = splits.train.images[names.index("f.png")]
    assert (rgba == 255).all()  # transparency is composited onto white
    grey = data.build(config(root, "data.size=16", "data.channels=1", name="folder"), False)
    assert grey.train.shape == (1, 16, 16)


def test_folder_split_is_stable_when_files_are_added(tmp_path):
    root = tmp_path / "pics"
    write_images(root, [f"{i:03d}.png" for i in range(40)], size=(8, 8))
    cfg = config(root, "data.size=8", "data.val_fraction=0.3", name="folder")
    first = data.build(cfg, progress=False)
    val_before = {first.info["images"][i] for i in first.val.rows}
    write_images(root, [f"new{i:03d}.png" for i in range(40)], size=(8, 8), seed=1)
    second = data.build(cfg, progress=False)
    val_after = {second.info["images"][i] for i in second.val.rows}
    train_after = {second.info["images"][i] for i in second.train.rows}
    assert val_before <= val_after and not val_before & train_after


def test_cache_reuse_and_invalidation(tmp_path):
    root = tmp_path / "CelebA"
    make_celeba(root, PRESENT, partition())
    cfg = config(root)
    first = data.build(cfg, progress=False)
    assert first.info["reused"] is False
    again = data.build(cfg, progress=False)
    assert again.info["reused"] is True and again.info["cache"] == first.info["cache"]
    assert np.array_equal(first.train.uint8(slice(None)), again.train.uint8(slice(None)))
    # Touch one file: rebuilt.
    path = root / "img_align_celeba" / "000001.jpg"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data.build(cfg, progress=False).info["reused"] is False
    assert data.build(cfg, progress=False).info["reused"] is True
    # Another size: its own cache, the first stays valid.
    other = data.build(config(root, "data.size=32"), progress=False)
    assert other.info["reused"] is False and other.info["cache"] != first.info["cache"]
    assert data.build(cfg, progress=False).info["reused"] is True
    # A removed file: rebuilt without it.
    (root / "img_align_celeba" / "000002.jpg").unlink()
    rebuilt = data.build(cfg, progress=False)
    assert rebuilt.info["reused"] is False and rebuilt.info["count"] == len(PRESENT) - 1


def test_interrupted_build_is_never_trusted(tmp_path, monkeypatch):
    root = tmp_path / "CelebA"
    make_celeba(root, PRESENT, partition())
    cfg = config(root)
    data.build(cfg, progress=False)
    path = root / "img_align_celeba" / "000003.jpg"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # forces a rebuild
    real = cache.decode_job
    calls = {"n": 0}

    def dies_half_way(job):
        calls["n"] += 1
        if calls["n"] > len(PRESENT) // 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(cache, "decode_job", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        data.build(cfg, progress=False)
    cache_dir = tmp_path / "cache"
    assert not list(cache_dir.glob("*.json"))  # no manifest: the old array is not trusted
    assert not list(cache_dir.glob(".*.tmp"))  # and no temporary is left behind
    monkeypatch.setattr(cache, "decode_job", real)
    splits = data.build(cfg, progress=False)
    assert splits.info["reused"] is False and splits.info["count"] == len(PRESENT)


def test_parallel_decoding_matches_serial(tmp_path):
    root = tmp_path / "pics"
    write_images(root, [f"{i:03d}.jpg" for i in range(80)], size=(60, 70))
    serial = data.build(config(root, "data.size=16", "data.workers=1", name="folder",
                               cache_dir=tmp_path / "c1"), progress=False)  # fmt: skip
    parallel = data.build(config(root, "data.size=16", "data.workers=2", name="folder",
                                 cache_dir=tmp_path / "c2"), progress=False)  # fmt: skip
    assert serial.info["images"] == parallel.info["images"]
    assert np.array_equal(serial.train.uint8(slice(None)), parallel.train.uint8(slice(None)))


def write_idx(path, array, magic, compress=False):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files(tmp_path, compress):
    gz = ".gz" if compress else ""
    rng = np.random.default_rng(0)
    write_idx(tmp_path / f"train-images-idx3-ubyte{gz}", rng.integers(0, 256, (50, 28, 28)),
              idx.IMAGES_MAGIC, compress)  # fmt: skip
    write_idx(tmp_path / f"train-labels-idx1-ubyte{gz}", np.arange(50) % 5, idx.LABELS_MAGIC,
              compress)  # fmt: skip
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{gz}", rng.integers(0, 256, (10, 28, 28)),
              idx.IMAGES_MAGIC, compress)  # fmt: skip
    splits = data.build(config(tmp_path, name="idx"), progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 10)
    assert splits.train.shape == (1, 28, 28)
    assert np.bincount(splits.val.labels).tolist() == [1] * 5
    assert data.build(config(tmp_path, "data.size=32", name="idx"), False).val.shape == (1, 32, 32)


def test_idx_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="expected train-images-idx3-ubyte"):
        data.build(config(tmp_path, name="idx"), progress=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x99" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file"):
        data.build(config(tmp_path, name="idx"), progress=False)
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.build(load_config(overrides=["data.name=fashion_mnist"]).data, progress=False)


@pytest.mark.skipif(
    not (idx.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package():
    splits = data.build(load_config(overrides=["data.name=fashion_mnist"]).data, progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)


def test_random_hflip_mirrors_some_images_and_keeps_the_rest():
    import torch

    x = torch.rand(64, 3, 4, 4)
    y = data.random_hflip(x)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 10 < mirrored.sum() < 54


def test_cache_dir_follows_vaelab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "env-cache"))
    assert cache.default_cache_dir() == tmp_path / "env-cache"


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "b.png", "c.png"], size=(8, 8))
    import vaelab.data.images as images

    real_open = images.Image.open

    def open_or_deny(path, *args, **kwargs):
        if str(path).endswith("b.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", open_or_deny)
    splits = data.build(config(root, "data.size=8", name="folder"), progress=False)
    assert [s["file"] for s in splits.info["skipped"]] == ["b.png"]
    assert "Permission denied" in splits.info["skipped"][0]["reason"]
    assert splits.info["count"] == 2
