"""Bad data inputs, in-process: the variants of each case that tests/hostile runs from the
command line (IDX headers, CelebA's text files, a damaged cache, decoding, listing, splits,
sizes), each refused with one line naming the file and what was expected, or repaired."""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaelab import data
from vaelab.config import load_config
from vaelab.data import DataError, base, cache, idx, images
from vaelab.data.folder import hash_split, image_files
from vaelab.data.synthetic import celeba_name, smooth_image, write_images


def config(root, *overrides, name="folder", cache_dir=None):
    cache_dir = cache_dir or root.parent / "cache"
    return load_config(
        overrides=[f"data.name={name}", f"data.root={root}", f"data.cache_dir={cache_dir}",
                   *overrides]
    ).data  # fmt: skip


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -- 1. IDX ----------------------------------------------------------------------------------
def write_idx(path, array, magic, dims=None, tail=b""):
    dims = array.shape if dims is None else dims
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    raw = header + array.astype(np.uint8).tobytes() + tail
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(raw)
    return path


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_idx_data_that_does_not_match_its_header(tmp_path, gz):
    path = tmp_path / f"train-images-idx3-ubyte{gz}"
    write_idx(path, np.zeros((3, 4, 4)), idx.IMAGES_MAGIC, dims=(4, 4, 4))
    with pytest.raises(DataError, match=r"header says \[4, 4, 4\] \(64 bytes of data\)") as err:
        idx.read_idx(path, "images")
    assert path.name in one_line(err)
    write_idx(path, np.zeros((3, 4, 4)), idx.IMAGES_MAGIC, tail=b"extra")
    with pytest.raises(DataError, match="holds (more|53 bytes)"):
        idx.read_idx(path, "images")


def test_idx_headers_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx.IMAGES_MAGIC.to_bytes(4, "big") + b"\x00\x00\x00\x02")
    with pytest.raises(DataError, match="header is cut short"):
        idx.read_idx(path, "images")
    write_idx(path, np.zeros((2, 4)), 0x00000802)
    with pytest.raises(DataError, match="an IDX file of 2 dimensions .* where images were"):
        idx.read_idx(path, "images")
    write_idx(path, np.zeros((2, 0, 4)), idx.IMAGES_MAGIC)
    with pytest.raises(DataError, match=r"its images are \[0, 4\] pixels"):
        idx.read_idx(path, "images")
    write_idx(path, np.zeros((2, 4, 4)), 0x00000D03)  # floats, not unsigned bytes
    with pytest.raises(DataError, match="not an IDX file of unsigned bytes"):
        idx.read_idx(path, "images")
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        idx.read_idx(path, "images")
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(100))[:-12] + b"garbage!!!!!")
    with pytest.raises(DataError, match="cannot read"):
        idx.read_idx(gz, "images")


def test_idx_header_beyond_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((50, 8, 8)),
                     idx.IMAGES_MAGIC)  # fmt: skip
    monkeypatch.setattr(idx, "available_memory", lambda: 1000)
    with pytest.raises(DataError, match="more than the 0.0 MB of memory available") as err:
        idx.read_idx(path, "images")
    assert path.name in one_line(err)


def test_idx_labels_count_and_test_shape_must_match(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 8, 8)), idx.IMAGES_MAGIC)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3), idx.LABELS_MAGIC)
    with pytest.raises(DataError, match="3 labels for the 4 images"):
        data.build(config(tmp_path, name="idx"), progress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4) % 2, idx.LABELS_MAGIC)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 9, 9)), idx.IMAGES_MAGIC)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte': images of \(9, 9\)"):
        data.build(config(tmp_path, name="idx"), progress=False)


def test_resize_array_crops_rectangles_to_their_centre(caplog):
    tall = np.zeros((3, 12, 8, 1), np.uint8)
    tall[:, 2:10] = 90
    with caplog.at_level(logging.INFO, logger="vaelab"):
        out = base.resize_array(tall, 4, 1, "tall.idx")
    assert out.shape == (3, 4, 4, 1) and (out == 90).all()
    assert caplog.text.count("centre-cropped to 8x8") == 1 and "tall.idx" in caplog.text
    square = np.full((2, 8, 8, 1), 7, np.uint8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vaelab"):
        assert (base.resize_array(square, 4, 3) == 7).all()
    assert "centre-cropped" not in caplog.text


# -- 2. CelebA -------------------------------------------------------------------------------
def make_celeba(root, numbers=(1, 2, 3)):
    write_images(root / "img_align_celeba", [celeba_name(n) for n in numbers], size=(20, 24))
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n")
    return root


ATTR_OK = "3\nSmiling Young\n000001.jpg 1 -1\n000002.jpg -1 -1\n000003.jpg 1 1\n"
BAD_CELEBA = [
    ("list_eval_partition.txt", "000001.jpg 0\n000002.jpg\n", "line 2: expected 2 fields"),
    ("list_eval_partition.txt", "000001.jpg 0\n\n000002.jpg 3\n", "line 3: the split of"),
    ("list_eval_partition.txt", "000001.jpg 0\n000001.jpg 1\n", "line 2: 000001.jpg is listed"),
    ("identity_CelebA.txt", "000001.jpg 7 8\n", "line 1: expected 2 fields, got 3"),
    ("identity_CelebA.txt", "000001.jpg -7\n", "line 1: the identity of 000001.jpg"),
    ("identity_CelebA.txt", "000001.jpg 1e99\n", "line 1: the identity"),
    ("identity_CelebA.txt", "000001.jpg 1\n000001.jpg 2\n", "line 2: 000001.jpg is listed"),
    ("list_attr_celeba.txt", "3\n", "expected a count line, a line of attribute names"),
    ("list_attr_celeba.txt", "3\nSmiling Young\n000001.jpg 1\n", "line 3: expected 3 fields"),
    ("list_attr_celeba.txt", "3 4\nSmiling Young\n", "line 1: expected the count line"),
    ("list_attr_celeba.txt", ATTR_OK.replace("3\n", "", 1), "line 1: expected the count line"),
    ("list_attr_celeba.txt", "1\n000001.jpg 1 -1\n", "line 2: expected the attribute names"),
    ("list_attr_celeba.txt", "1\nSmiling Smiling\n000001.jpg 1 1\n", "Smiling is named twice"),
    ("list_attr_celeba.txt", ATTR_OK.replace("3\n", "5\n"), "line 1: the count line says 5"),
    ("list_attr_celeba.txt", ATTR_OK.replace("-1 -1", "+1 -1"), "line 4: attribute values"),
    ("list_attr_celeba.txt", ATTR_OK.replace("-1 -1", "1.0 -1"), "got '1.0' for Smiling"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD_CELEBA)
def test_bad_celeba_text_files_are_refused_by_line(tmp_path, name, text, expected):
    root = make_celeba(tmp_path / "CelebA")
    (root / name).write_text(text)
    with pytest.raises(DataError) as err:
        data.build(config(root, "data.size=8", name="celeba"), progress=False)
    message = one_line(err)
    assert name in message and expected in message, message
    assert not (tmp_path / "cache").exists()  # refused before any image was prepared


@pytest.mark.parametrize(
    "name", ["list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt"]
)
def test_celeba_text_files_that_are_not_utf8(tmp_path, name):
    root = make_celeba(tmp_path / "CelebA")
    (root / name).write_bytes("3\nSmiling Young\n000001.jpg 1 -1\nÄ\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{name}' line 4: not UTF-8 text"):
        data.build(config(root, "data.size=8", name="celeba"), progress=False)


def test_celeba_text_with_bom_and_windows_line_ends_is_fine(tmp_path):
    root = make_celeba(tmp_path / "CelebA")
    (root / "list_eval_partition.txt").write_bytes(
        b"\xef\xbb\xbf000001.jpg 0\r\n000002.jpg 0\r\n000003.jpg 1\r\n"
    )
    (root / "list_attr_celeba.txt").write_bytes(ATTR_OK.replace("\n", "\r\n").encode())
    (root / "identity_CelebA.txt").write_text("000001.jpg 5\n000002.jpg 5\n000003.jpg 6\n")
    splits = data.build(config(root, "data.size=8", name="celeba"), progress=False)
    assert (len(splits.train), len(splits.val)) == (2, 1)
    assert splits.train.attributes["Smiling"].tolist() == [1, -1]
    assert splits.val.labels.tolist() == [6]


@pytest.mark.parametrize("kind", ["dangling", "folder", "fifo"])
def test_celeba_text_file_that_is_not_a_file(tmp_path, kind):
    root = make_celeba(tmp_path / "CelebA")
    path = root / "identity_CelebA.txt"
    if kind == "dangling":
        path.symlink_to(tmp_path / "nowhere.txt")
    elif kind == "folder":
        path.mkdir()
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(path)  # reading it would block
    with pytest.raises(DataError, match="identity_CelebA.txt': (a dangling link|not a regular)"):
        data.build(config(root, "data.size=8", name="celeba"), progress=False)


# -- 3. the preprocessing cache --------------------------------------------------------------
def folder_cache(tmp_path, n=6):
    root = tmp_path / "pics"
    write_images(root, [f"{i}.png" for i in range(n)], size=(8, 8))
    cfg = config(root, "data.size=8")
    first = data.build(cfg, progress=False)
    return cfg, np.array(first.train.images), Path(first.info["cache"])


def edit_manifest(change):
    def corrupt(npy):
        path = npy.with_suffix(".json")
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return corrupt


def write_manifest(raw: bytes):
    return lambda npy: npy.with_suffix(".json").write_bytes(raw)


def replace_array(array, **kwargs):
    def corrupt(npy):
        with open(npy, "wb") as f:
            np.save(f, array, **kwargs)

    return corrupt


def append(npy):
    with open(npy, "ab") as f:
        f.write(b"\x00" * 10)


def swap_names(m):
    m["images"][0], m["images"][1] = m["images"][1], m["images"][0]


def as_npz(npy):
    with open(npy, "wb") as f:
        np.savez(f, images=np.zeros((6, 8, 8, 3), np.uint8))


CORRUPTIONS = {
    "manifest not UTF-8": (write_manifest(b'{"version": 2, "\xff": 1}'), "not UTF-8"),
    "manifest not JSON": (write_manifest(b'{"version": 2,'), "not valid JSON"),
    "manifest deeply nested": (write_manifest(b"[" * 100000), "not valid JSON"),
    "manifest a list": (write_manifest(b"[]"), "not a JSON object"),
    "manifest version true": (edit_manifest(lambda m: m.update(version=True)), "format"),
    "count a string": (edit_manifest(lambda m: m.update(count="6")), "count is not"),
    "count too high": (edit_manifest(lambda m: m.update(count=7)), "lists 6 images but counts 7"),
    "fewer names": (edit_manifest(lambda m: m["images"].pop()), "lists 5 images but counts 6"),
    "names not a list": (edit_manifest(lambda m: m.update(images="0.png")), "not a list"),
    "a name not a string": (edit_manifest(lambda m: m["images"].__setitem__(0, 3)), "not a list"),
    "skipped wrong": (edit_manifest(lambda m: m.update(skipped=[{"file": 1}])), "skipped files"),
    "names reordered": (edit_manifest(swap_names), "are not the source files"),
    "array truncated": (lambda npy: npy.write_bytes(npy.read_bytes()[:-7]), "cached array"),
    "array with extra bytes": (append, "not its header's"),
    "array of objects": (replace_array(np.array([{}] * 6), allow_pickle=True), "cannot be read"),
    "array of floats": (replace_array(np.zeros((6, 8, 8, 3), np.float32)), "not uint8"),
    "array of another shape": (replace_array(np.zeros((6, 8, 8, 1), np.uint8)), "not uint8"),
    "array in Fortran order": (
        replace_array(np.asfortranarray(np.zeros((6, 8, 8, 3), np.uint8))),
        "not in C order",
    ),
    "an npz archive": (as_npz, "not an .npy array"),
    "array empty": (lambda npy: npy.write_bytes(b""), "cannot be read"),
    "array is text": (lambda npy: npy.write_text("hello\n"), "cannot be read"),
    "array missing": (lambda npy: npy.unlink(), "its manifest has no array"),
    "manifest missing": (lambda npy: npy.with_suffix(".json").unlink(), "interrupted build"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_cache_is_logged_and_rebuilt(tmp_path, caplog, case):
    corrupt, why = CORRUPTIONS[case]
    cfg, images, npy = folder_cache(tmp_path)
    corrupt(npy)
    with caplog.at_level(logging.INFO, logger="vaelab"):
        again = data.build(cfg, progress=False)
    assert again.info["reused"] is False
    line = next(r.message for r in caplog.records if r.message.startswith("preparing"))
    assert why in line, line
    assert np.array_equal(np.array(again.train.images), images)
    assert data.build(cfg, progress=False).info["reused"] is True


def test_the_cache_never_unpickles(tmp_path):
    cfg, _, npy = folder_cache(tmp_path)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    objects = np.empty(6, dtype=object)
    objects[:] = [Payload() for _ in range(6)]
    with open(npy, "wb") as f:
        np.save(f, objects, allow_pickle=True)
    assert data.build(cfg, progress=False).info["reused"] is False
    assert not marker.exists()


def test_an_unusable_cache_folder_is_one_line(tmp_path):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "b.png"], size=(8, 8))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match="a-file.*not a folder.*data.cache_dir") as err:
        data.build(config(root, "data.size=8", cache_dir=tmp_path / "a-file"), progress=False)
    one_line(err)
    cfg = config(root, "data.size=8")
    path = Path(data.build(cfg, progress=False).info["cache"])
    path.unlink()
    path.mkdir()  # something in the way of the array
    with pytest.raises(DataError, match="cannot write the cache"):
        data.build(cfg, progress=False)


def test_cache_beyond_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "b.png"], size=(8, 8))

    class Usage:
        free = 1000

    monkeypatch.setattr(cache.shutil, "disk_usage", lambda folder: Usage)
    with pytest.raises(DataError, match=r"data.size=16: caching 2 images of 16x16x3") as err:
        data.build(config(root, "data.size=16"), progress=False)
    assert "0.0 MB are free" in one_line(err)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_no_bar_when_not_a_terminal(tmp_path, capsys):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "b.png"], size=(8, 8))
    data.build(config(root, "data.size=8"), progress=True)
    assert "preparing" not in capsys.readouterr().err


def test_lock_file_is_the_caches_own(tmp_path):
    _, _, npy = folder_cache(tmp_path)
    assert (npy.parent / f".{npy.name}.lock").is_file()
    assert cache.FORMAT_VERSION >= 2  # decoding changed: caches of version 1 are not used


# -- 4. decoding -----------------------------------------------------------------------------
def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257], [1000, 30000, 65407, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I;16B", "I;16L", "I")  # what Pillow gives for it
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)  # value / 257, rounded
    wide = np.tile(values, (2, 1))  # 4x4: no crop, no resize
    Image.fromarray(wide).save(path)
    grey = images.load_image(path, 4, 0, 1)[..., 0]
    assert np.array_equal(grey, np.tile(expected, (2, 1)))
    rgb = images.load_image(path, 4, 0, 3)
    assert np.array_equal(rgb, np.repeat(np.tile(expected, (2, 1))[..., None], 3, axis=2))


def write_png16_rgb(path, rgb16):
    """A 16-bit RGB PNG, written chunk by chunk (Pillow cannot write one)."""
    import struct

    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_sixteen_bit_rgb_png_keeps_its_values(tmp_path):
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (4, 4, 3)).astype(np.uint16)
    rgb16[0, 0] = (65535, 30000, 0)
    path = tmp_path / "deep-rgb.png"
    write_png16_rgb(path, rgb16)
    with Image.open(path) as img:
        mode = img.mode  # Pillow keeps the high byte: 8-bit RGB already
    out = images.load_image(path, 4, 0, 3).astype(int)
    expected = np.floor(rgb16 / 257 + 0.5)
    assert np.abs(out - expected).max() <= 1, mode
    assert out[0, 0].tolist() == [255, 117, 0]


def exif_jpeg(path, picture: Image.Image, orientation: int) -> None:
    exif = Image.Exif()
    exif[images.ORIENTATION] = orientation
    picture.save(path, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = smooth_image(np.random.default_rng(orientation), 24, 40)  # 24 wide, 40 high
    exif_jpeg(tmp_path / "photo.jpg", stored, orientation)
    with Image.open(tmp_path / "photo.jpg") as img:  # decoded in full, then turned upright
        upright = img.convert("RGB")
        if orientation != 1:
            upright = upright.transpose(images.TRANSPOSE[orientation])
    upright.save(tmp_path / "upright.png")
    got = images.load_image(tmp_path / "photo.jpg", 16, 0, 3)
    assert np.array_equal(got, images.load_image(tmp_path / "upright.png", 16, 0, 3))


def test_exif_orientation_with_draft_decoding(tmp_path):
    stored = smooth_image(np.random.default_rng(0), 400, 240)  # decoded at 1/4 or 1/8 size
    exif_jpeg(tmp_path / "photo.jpg", stored, 6)
    with Image.open(tmp_path / "photo.jpg") as img:
        img.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    got = images.load_image(tmp_path / "photo.jpg", 16, 0, 3).astype(float)
    want = images.load_image(tmp_path / "upright.png", 16, 0, 3).astype(float)
    unturned = np.asarray(stored.crop((80, 0, 320, 240)).resize((16, 16)), float)
    assert np.abs(got - want).mean() < 4  # draft decoding: close, not exact
    assert np.abs(got - unturned).mean() > 3 * np.abs(got - want).mean()


def test_exif_orientation_in_a_png(tmp_path):
    stored = smooth_image(np.random.default_rng(1), 12, 20)
    exif = Image.Exif()
    exif[images.ORIENTATION] = 8
    stored.save(tmp_path / "photo.png", exif=exif.tobytes())
    stored.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "upright.png")
    got = images.load_image(tmp_path / "photo.png", 8, 0, 3)
    assert np.array_equal(got, images.load_image(tmp_path / "upright.png", 8, 0, 3))


# -- 5. listing ------------------------------------------------------------------------------
def test_image_files_follows_links_once_and_skips_odd_files(tmp_path, caplog):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "sub/b.png", ".hidden.png", "x.jpg/inside.png"], size=(4, 4))
    write_images(tmp_path / "out", ["c.png"], size=(4, 4))
    (root / "l1").symlink_to(tmp_path / "out")
    (root / "l2").symlink_to(tmp_path / "out")  # the same folder again: listed once, as l1
    (root / "sub" / "up").symlink_to(root)  # a loop
    (root / "again").symlink_to(root / "sub")  # a second name of a folder inside
    (root / "dead.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "notes.txt").symlink_to(tmp_path / "missing.txt")  # not an image: not counted
    (root / "self.png").symlink_to(root / "self.png")  # a link to itself
    with caplog.at_level(logging.INFO, logger="vaelab"):
        found = image_files(root)
    assert found == ["a.png", "l1/c.png", "sub/b.png", "x.jpg/inside.png"]
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 entries" in warnings[0]
    assert "dead.jpg (a dangling link)" in warnings[0] and "self.png" in warnings[0]
    assert "not following 3 linked folders" in caplog.text
    assert image_files(root, recursive=False) == ["a.png"]


@pytest.mark.skipif(
    not (hasattr(socket, "AF_UNIX") and hasattr(os, "mkfifo")), reason="no Unix sockets or FIFOs"
)
def test_image_files_skips_sockets_and_fifos(tmp_path, caplog):
    root = tmp_path / "pics"
    write_images(root, ["a.png"], size=(4, 4))
    os.mkfifo(root / "b.png")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(root / "c.webp"))
        with caplog.at_level(logging.INFO, logger="vaelab"):
            assert image_files(root) == ["a.png"]
    finally:
        server.close()
    assert "b.png (a FIFO), c.webp (a socket)" in caplog.text


def test_image_files_names_the_first_three_skipped(tmp_path, caplog):
    root = tmp_path / "pics"
    write_images(root, ["a.png"], size=(4, 4))
    for i in range(5):
        (root / f"dead{i}.png").symlink_to(tmp_path / "nowhere")
    with caplog.at_level(logging.INFO, logger="vaelab"):
        image_files(root)
    assert "skipped 5 entries" in caplog.text and "dead2.png" in caplog.text
    assert "dead3.png" not in caplog.text and "and 2 more" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads all")
def test_image_files_reports_a_folder_it_cannot_list(tmp_path, caplog):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "locked/b.png"], size=(4, 4))
    (root / "locked").chmod(0)
    try:
        with caplog.at_level(logging.INFO, logger="vaelab"):
            assert image_files(root) == ["a.png"]
    finally:
        (root / "locked").chmod(0o755)
    assert "locked/ (a folder that cannot be listed" in caplog.text


# -- 6. splits -------------------------------------------------------------------------------
def test_hash_split_keeps_one_image_on_each_side():
    names = ["a.png", "b.png"]
    for fraction in (0.001, 0.5, 0.999):
        train, val = hash_split(names, fraction)
        assert len(train) == 1 and len(val) == 1
    train, val = hash_split([f"{i}.png" for i in range(50)], 0.999)
    assert len(train) == 1 and len(val) == 49


def test_every_source_needs_a_train_and_a_val_image(tmp_path):
    rows = np.zeros((4, 785), dtype=np.int64)
    rows[:, 784] = [0, 0, 1, 1]
    csv = tmp_path / "digits.csv"
    np.savetxt(csv, rows, fmt="%d", delimiter=",")
    cfg = load_config(overrides=[f"data.root={csv}", "data.val_fraction=0.999"]).data
    with pytest.raises(DataError, match=r"data.val_fraction=0.999: .* 0 train and 4 val") as err:
        data.build(cfg)
    assert "lower data.val_fraction" in one_line(err)
    shapes = load_config(overrides=["data.name=shapes", "data.subset=2",
                                    "data.val_fraction=0.9"]).data  # fmt: skip
    with pytest.raises(DataError, match="data.val_fraction=0.9: data.name=shapes gives 0 train"):
        data.build(shapes, progress=False)


# -- 7. sizes --------------------------------------------------------------------------------
def test_in_memory_images_beyond_memory_are_refused(monkeypatch):
    monkeypatch.setattr(base, "available_memory", lambda: 10**6)
    with pytest.raises(DataError, match=r"data.size=128: 100 images of 128x128x1 would need") as e:
        base.resize_array(np.zeros((100, 28, 28, 1), np.uint8), 128, 1)
    assert "choose a smaller data.size" in one_line(e)
    assert base.resize_array(np.zeros((10, 28, 28, 1), np.uint8), 8, 1).shape == (10, 8, 8, 1)


def test_available_memory_is_a_positive_number():
    free = base.available_memory()
    assert free is None or free > 0


def test_a_cache_folder_that_cannot_be_written_is_read_if_valid(tmp_path, monkeypatch):
    cfg, images, npy = folder_cache(tmp_path)
    from vaelab.rundir import RunDirError

    def cannot(cache_dir, npy):
        raise RunDirError(f"cannot write in '{cache_dir}': Read-only file system")

    monkeypatch.setattr(cache, "_lock", cannot)
    again = data.build(cfg, progress=False)  # someone else's valid cache: used as it is
    assert again.info["reused"] is True
    assert np.array_equal(np.array(again.train.images), images)
    npy.with_suffix(".json").write_text("{}")
    with pytest.raises(DataError, match="Read-only file system .*data.cache_dir") as err:
        data.build(cfg, progress=False)
    one_line(err)


def test_a_csv_of_one_digit_is_too_few_not_misread(tmp_path):
    csv = tmp_path / "one.csv"
    np.savetxt(csv, np.zeros((1, 785), np.int64), fmt="%d", delimiter=",")
    with pytest.raises(DataError, match="0 train and 1 val images of 1; .* at least 2 images"):
        data.build(load_config(overrides=[f"data.root={csv}"]).data)


def test_file_names_that_are_not_utf8(tmp_path):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "b.png", "c.png"], size=(8, 8))
    try:
        os.rename(root / "a.png", os.fsencode(root) + b"/\xff\xfe.png")
    except (OSError, ValueError):
        pytest.skip("this file system refuses names that are not UTF-8")
    splits = data.build(config(root, "data.size=8"), progress=False)
    assert len(splits.train) + len(splits.val) == 3
    assert "\udcff\udcfe.png" in splits.info["images"]
    assert data.build(config(root, "data.size=8"), progress=False).info["reused"] is True


def test_decoding_beyond_memory_is_refused_before_writing(tmp_path, monkeypatch):
    root = tmp_path / "pics"
    write_images(root, ["a.png", "b.png"], size=(8, 8))
    monkeypatch.setattr(base, "available_memory", lambda: 10_000)
    with pytest.raises(DataError, match=r"data.size=64: decoding the images would need"):
        data.build(config(root, "data.size=64", "data.workers=1"), progress=False)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
