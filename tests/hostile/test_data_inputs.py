"""Bad data inputs from the command line: each ends in one line naming the file (or key) and
what was expected (exit 2, no traceback), or is repaired and says so; no file that existed
before changes, and a refusal leaves nothing half-written."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.hostile.conftest import assert_refused, assert_unchanged, run_cli, snapshot
from vaelab.data.synthetic import celeba_name, write_images

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
CACHE = ".cache-vaelab"  # where run_cli points VAELAB_CACHE, under the test's folder
TINY = ["model.widths=[4,8]", "model.latent_dim=2", "train.epochs=1"]


def write_idx(path: Path, array: np.ndarray, magic: int, dims: tuple[int, ...] | None = None):
    dims = array.shape if dims is None else dims
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(raw)


def idx_folder(root: Path, n: int = 20, height: int = 8, width: int = 8) -> Path:
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n, height, width)),
              IMAGES_MAGIC)  # fmt: skip
    write_idx(root / "train-labels-idx1-ubyte", np.arange(n) % 2, LABELS_MAGIC)
    return root


def cache_files(tmp_path: Path) -> list[str]:
    """What the cache holds besides its lock files."""
    folder = tmp_path / CACHE
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# -- 1. IDX ----------------------------------------------------------------------------------
def test_idx_with_zero_images_is_refused(tmp_path):
    root = tmp_path / "idx"
    write_idx(root / "train-images-idx3-ubyte", np.zeros((0, 8, 8)), IMAGES_MAGIC)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(0), LABELS_MAGIC)
    before = snapshot(tmp_path)
    result = run_cli("prepare", "data.name=idx", f"data.root={root}", cwd=tmp_path)
    assert_refused(result, "train-images-idx3-ubyte", "0 images")
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("swapped", ["labels_as_images", "images_as_labels"])
def test_idx_file_of_the_wrong_role_is_refused(tmp_path, swapped):
    root = idx_folder(tmp_path / "idx")
    if swapped == "labels_as_images":
        shutil.copy(root / "train-labels-idx1-ubyte", root / "train-images-idx3-ubyte")
        words = ("train-images-idx3-ubyte", "an IDX file of labels", "images were expected")
    else:
        shutil.copy(root / "train-images-idx3-ubyte", root / "train-labels-idx1-ubyte")
        words = ("train-labels-idx1-ubyte", "an IDX file of images", "labels were expected")
    before = snapshot(tmp_path)
    result = run_cli("prepare", "data.name=idx", f"data.root={root}", cwd=tmp_path)
    assert_refused(result, *words)
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("compressed", [False, True])
def test_idx_header_whose_size_overflows_is_refused(tmp_path, compressed):
    # 2**31 * 2**31 * 4 = 2**64: 0 in 64-bit arithmetic, as many bytes as the file holds.
    root = idx_folder(tmp_path / "idx")
    images = root / ("train-images-idx3-ubyte" + (".gz" if compressed else ""))
    (root / "train-images-idx3-ubyte").unlink()
    write_idx(images, np.zeros(0), IMAGES_MAGIC, dims=(2**31, 2**31, 4))
    before = snapshot(tmp_path)
    result = run_cli("prepare", "data.name=idx", f"data.root={root}", cwd=tmp_path)
    assert_refused(result, images.name, "header says [2147483648, 2147483648, 4]")
    assert_unchanged(before, tmp_path)


def test_rectangular_idx_images_are_centre_cropped_not_squashed(tmp_path):
    root = tmp_path / "idx"
    images = np.zeros((4, 8, 12), np.uint8)
    images[:, :, 2:10] = 200  # the centre square is 200, the two columns each side are 0
    write_idx(root / "train-images-idx3-ubyte", images, IMAGES_MAGIC)
    write_idx(root / "train-labels-idx1-ubyte", np.arange(4) % 2, LABELS_MAGIC)
    before = snapshot(tmp_path)
    result = run_cli("prepare", "data.name=idx", f"data.root={root}", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.lines if "centre-cropped" in line]
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0] and "8x8" in lines[0]
    assert_unchanged(before, tmp_path)

    from vaelab import data
    from vaelab.config import load_config

    cfg = load_config(overrides=["data.name=idx", f"data.root={root}"]).data
    splits = data.build(cfg, progress=False)
    assert splits.train.shape == (1, 8, 8)  # the short side, not the height by default
    assert (splits.train.uint8(slice(None)) == 200).all()


# -- 2. CelebA -------------------------------------------------------------------------------
def make_celeba(root: Path) -> Path:
    write_images(root / "img_align_celeba", [celeba_name(n) for n in (1, 2, 3)], size=(20, 24))
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n")
    return root


CELEBA_CASES = {
    "partition_not_utf8": (
        "list_eval_partition.txt",
        b"000001.jpg 0\n000002.jpg 0\n000003.jpg \xff1\n",
        ("list_eval_partition.txt", "line 3", "not UTF-8"),
    ),
    "attribute_not_minus_one_or_one": (
        "list_attr_celeba.txt",
        b"3\nSmiling Young\n000001.jpg 1 -1\n000002.jpg 0 1\n000003.jpg 1 1\n",
        ("list_attr_celeba.txt", "line 4", "must be -1 or 1", "'0'", "Smiling"),
    ),
    "identity_not_an_integer": (
        "identity_CelebA.txt",
        b"000001.jpg 7\n000002.jpg seven\n000003.jpg 9\n",
        ("identity_CelebA.txt", "line 2", "whole number", "'seven'"),
    ),
    "bad_count_line": (
        "list_attr_celeba.txt",
        b"three\nSmiling Young\n000001.jpg 1 -1\n000002.jpg -1 1\n000003.jpg 1 1\n",
        ("list_attr_celeba.txt", "line 1", "count line"),
    ),
}


@pytest.mark.parametrize("case", sorted(CELEBA_CASES))
def test_bad_celeba_metadata_is_one_line_naming_file_and_line(tmp_path, case):
    name, content, words = CELEBA_CASES[case]
    root = make_celeba(tmp_path / "CelebA")
    (root / name).write_bytes(content)
    before = snapshot(tmp_path)
    args = ("prepare", "data.name=celeba", f"data.root={root}", "data.size=8", "data.crop=16")
    assert_refused(run_cli(*args, cwd=tmp_path), *words)
    assert_unchanged(before, tmp_path)
    assert cache_files(tmp_path) == []  # refused before any image was prepared


# -- 3. the preprocessing cache --------------------------------------------------------------
def build_in_process(tmp_path: Path, root: Path):
    """The folder ``root`` built in-process, with the cache where the CLI looks for it."""
    from vaelab import data
    from vaelab.config import load_config

    cfg = load_config(
        overrides=["data.name=folder", f"data.root={root}", "data.size=8",
                   f"data.cache_dir={tmp_path / CACHE}"]
    ).data  # fmt: skip
    return data.build(cfg, progress=False)


def folder_and_cache(tmp_path: Path, n: int = 6) -> tuple[Path, Path, np.ndarray]:
    """A folder of tiny images, its cache file and the images in it."""
    root = tmp_path / "pics"
    write_images(root, [f"{i}.png" for i in range(n)], size=(8, 8))
    splits = build_in_process(tmp_path, root)
    return root, Path(splits.info["cache"]), np.array(splits.train.images)


class Unpickled:
    """Unpickling this creates the file ``marker``: proof that a cache was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def corrupt_truncated(npy: Path, tmp_path: Path) -> str:
    raw = npy.read_bytes()
    npy.write_bytes(raw[: len(raw) - 50])
    return "the cached array"


def corrupt_pickled(npy: Path, tmp_path: Path) -> str:
    objects = np.empty(6, dtype=object)
    objects[:] = [Unpickled(tmp_path / "unpickled") for _ in range(6)]
    with open(npy, "wb") as f:
        np.save(f, objects, allow_pickle=True)
    return "cannot be read"


def corrupt_manifest_list(npy: Path, tmp_path: Path) -> str:
    npy.with_suffix(".json").write_text("[1, 2, 3]\n")
    return "not a JSON object"


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_pickled, corrupt_manifest_list])
def test_a_damaged_cache_is_rebuilt_never_trusted(tmp_path, corrupt):
    root, npy, images = folder_and_cache(tmp_path)
    why = corrupt(npy, tmp_path)
    before = snapshot(tmp_path)
    args = ("prepare", "data.name=folder", f"data.root={root}", "data.size=8")
    result = run_cli(*args, cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert any("preparing" in line and why in line for line in result.lines), result.stderr
    assert "prepared 6 images" in result.stdout
    assert not (tmp_path / "unpickled").exists()  # nothing was unpickled
    assert_unchanged(before, tmp_path)
    assert np.array_equal(np.load(npy, allow_pickle=False), images)  # rebuilt, right content
    assert build_in_process(tmp_path, root).info["reused"] is True  # the rebuilt one is valid


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "VAELAB_CACHE": str(cwd / CACHE)}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "vaelab", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_prepare_waits_for_the_first_then_reuses_its_cache(tmp_path):
    from vaelab import rundir

    root, npy, _ = folder_and_cache(tmp_path)
    npy.with_suffix(".json").unlink()  # the cache must be built again ...
    # ... by "the first process": this test, holding the cache's lock while it rebuilds.
    held = rundir.lock(npy.parent, name=f".{npy.name}.lock")
    first_tmp = npy.parent / f".{npy.name}.{os.getpid()}.tmp"
    first_tmp.write_bytes(b"the first process's half-written array")
    second = start_cli("prepare", "data.name=folder", f"data.root={root}", "data.size=8",
                       cwd=tmp_path)  # fmt: skip
    stderr: list[str] = []
    waiting = threading.Event()

    def read() -> None:
        for line in second.stderr:
            stderr.append(line)
            if "waiting for another process" in line:
                waiting.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not waiting.is_set() and second.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.is_set(), "".join(stderr)
        time.sleep(0.5)
        assert second.poll() is None  # it waits ...
        assert first_tmp.exists()  # ... and leaves the first one's temporary alone
        first_tmp.unlink()
        from vaelab.data import cache
        from vaelab.data.folder import image_files

        sources = cache.listing(root, image_files(root))
        params = {"size": 8, "crop": 0, "channels": 3}
        cache._build(root, sources, npy, npy.with_suffix(".json"), params, 1, False)
    finally:
        held.release()
    out, _ = second.communicate(timeout=120)
    reader.join(timeout=10)
    assert second.returncode == 0, "".join(stderr)
    assert "already prepared" in out  # it found the first one's cache and reused it
    assert not list(npy.parent.glob("*.tmp"))


def test_two_prepares_at_once_both_succeed(tmp_path):
    root = tmp_path / "pics"
    write_images(root, [f"{i:03d}.png" for i in range(120)], size=(32, 32))
    args = ("prepare", "data.name=folder", f"data.root={root}", "data.size=16",
            "data.workers=1")  # fmt: skip
    procs = [start_cli(*args, cwd=tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        assert "120 images" in out
    outs = [out for out, _ in results]
    assert sum(out.startswith("prepared 120 images") for out in outs) == 1, outs
    assert sum("already prepared" in out for out in outs) == 1, outs
    assert not [n for n in cache_files(tmp_path) if n.endswith(".tmp")]


# -- 5. listing ------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_links_followed_loops_cut_and_odd_files_counted_never_opened(tmp_path):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "sub/b.png"], size=(8, 8))
    write_images(tmp_path / "elsewhere", ["c.png", "d.png"], size=(8, 8))
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(root / "pipe.jpg")  # opening it would block until someone writes
    before = snapshot(tmp_path)
    args = ("prepare", "data.name=folder", f"data.root={root}", "data.size=8")
    result = run_cli(*args, cwd=tmp_path)
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "prepared 4 images" in result.stdout  # a, sub/b and the linked c, d
    warnings = [line for line in result.lines if "skipped 2 entries" in line]
    assert len(warnings) == 1, result.stderr
    assert "gone.png (a dangling link)" in warnings[0] and "pipe.jpg (a FIFO)" in warnings[0]
    assert_unchanged(before, tmp_path)


# -- 6. splits -------------------------------------------------------------------------------
def test_one_image_is_too_few_to_split(tmp_path):
    root = tmp_path / "pics"
    write_images(root, ["only.png"], size=(8, 8))
    before = snapshot(tmp_path)
    result = run_cli("prepare", "data.name=folder", f"data.root={root}", "data.size=8",
                     cwd=tmp_path)  # fmt: skip
    assert_refused(result, "data.val_fraction", "1 train and 0 val", "at least 2 images")
    assert_unchanged(before, tmp_path)


def test_val_fraction_leaving_no_training_image_is_refused_before_a_run(tmp_path):
    root = idx_folder(tmp_path / "idx", n=10)
    before = snapshot(tmp_path)
    result = run_cli("train", "--out", "run", "data.name=idx", f"data.root={root}",
                     "data.val_fraction=0.999", *TINY, cwd=tmp_path)  # fmt: skip
    assert_refused(result, "data.val_fraction=0.999", "0 train and 10 val")
    assert_unchanged(before, tmp_path)  # no run folder either


# -- 7. data.size too large ------------------------------------------------------------------
def test_data_size_beyond_the_free_disk_is_refused_before_writing(tmp_path):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "b.png"], size=(8, 8))
    free = shutil.disk_usage(tmp_path).free
    size = math.isqrt(free // (2 * 3)) + 1000
    before = snapshot(tmp_path)
    result = run_cli("prepare", "data.name=folder", f"data.root={root}", f"data.size={size}",
                     cwd=tmp_path)  # fmt: skip
    assert_refused(result, f"data.size={size}", "GB", "free")
    assert_unchanged(before, tmp_path)
    assert cache_files(tmp_path) == []


def test_data_size_beyond_memory_is_refused_before_allocating(tmp_path):
    from vaelab.data.base import available_memory

    root = idx_folder(tmp_path / "idx", n=10)
    size = math.isqrt(2 * (available_memory() or 2**40) // 10) + 1000
    before = snapshot(tmp_path)
    result = run_cli("prepare", "data.name=idx", f"data.root={root}", f"data.size={size}",
                     cwd=tmp_path)  # fmt: skip
    assert_refused(result, f"data.size={size}", "GB of memory", "available")
    assert_unchanged(before, tmp_path)


# -- decoding, from the command line ---------------------------------------------------------
def prepared(tmp_path: Path, folder: Path) -> dict[str, np.ndarray]:
    """`vaelab prepare` a folder at 16x16 grey; the cached images by file name."""
    import json

    result = run_cli(
        "prepare", "data.name=folder", f"data.root={folder}", "data.size=16",
        "data.channels=1", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    (npy,) = (tmp_path / CACHE).glob("folder-*.npy")
    names = json.loads(npy.with_suffix(".json").read_text())["images"]
    return dict(zip(names, np.load(npy)[..., 0], strict=True))


def test_a_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 128 * 257, np.uint16)).save(folder / "deep.png")
    Image.fromarray(np.full((16, 16), 30, np.uint8)).save(folder / "plain.png")
    images = prepared(tmp_path, folder)
    assert np.abs(images["deep.png"].astype(int) - 128).max() <= 1  # was 255: clipped
    assert np.abs(images["plain.png"].astype(int) - 30).max() <= 1


def test_a_jpeg_is_turned_as_its_exif_orientation_says(tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    stored = np.zeros((16, 16), np.uint8)
    stored[:8] = 255  # top half white as stored; orientation 6 shows it turned 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "turned.jpg", exif=exif.tobytes(), quality=100)
    Image.fromarray(stored).save(folder / "plain.jpg", quality=100)
    images = prepared(tmp_path, folder)
    turned, plain = images["turned.jpg"].astype(int), images["plain.jpg"].astype(int)
    assert turned[:, -3:].mean() > 200 and turned[:, :3].mean() < 50  # white on the right
    assert plain[:3].mean() > 200 and plain[-3:].mean() < 50  # no tag: as stored
