"""FID's Inception-v3 (vaelab.inception) and `vaelab quality --inception-weights`."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vaelab
from tests.conftest import tiny_config
from vaelab import inception, quality
from vaelab.checkpoint import CheckpointError
from vaelab.cli import main
from vaelab.report.draw import run_split
from vaelab.report.html import _quality_section

# Tensors of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3
# layout with 1008 classes and no auxiliary classifier, converted from TensorFlow's graph):
# 94 convolutions, each a weight and four batch-norm tensors (weight, bias, running_mean,
# running_var; no step counter), and fc's weight and bias.
PUBLISHED_TENSORS = 94 * 5 + 2
# Its learnable values: torchvision documents 27,161,264 for inception_v3 (with the auxiliary
# classifier: 98,560 + 2,459,136 + 769,000; fc with 1000 classes), so 23,834,568 without it,
# and 16,392 more for 8 more classes.
PUBLISHED_PARAMETERS = 27_161_264 - (98_560 + 2_459_136 + 769_000) + 8 * 2048 + 8
PUBLISHED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.bias": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch3x3dbl_1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch1x1.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6b.branch7x7_1.conv.weight": (128, 768, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6c.branch7x7_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6d.branch7x7dbl_3.conv.weight": (160, 160, 1, 7),
    "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
    "Mixed_6e.branch_pool.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_1.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_2.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_1.conv.weight": (384, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
    "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1),
    "Mixed_7c.branch1x1.conv.weight": (320, 2048, 1, 1),
    "Mixed_7c.branch3x3dbl_3a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_mean": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every tensor (batch-norm statistics too, variances positive)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in inception.InceptionV3().state_dict().items():
        x = torch.randn(v.shape, generator=g)
        if k.endswith("conv.weight"):  # He scale keeps 94 layers' activations finite
            x *= (2 / v[0].numel()) ** 0.5
        elif k.endswith("running_var"):
            x = 0.5 + x.abs()
        else:
            x *= 0.1
        state[k] = x + 1 if k.endswith("bn.weight") else x
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weights state dict, saved as .pth (torch.save) and as .safetensors."""
    out = tmp_path_factory.mktemp("inception")
    state = _random_state()
    torch.save(state, out / "random.pth")
    save_file(state, str(out / "random.safetensors"))
    return state, out


def _images(n: int = 3, channels: int = 1, side: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def small_input(monkeypatch):
    """75 x 75 input (the smallest Inception-v3 takes) instead of 299: 16 times faster. The
    299 path is tested in test_features_at_the_real_input_size_are_2048_values."""
    monkeypatch.setattr(inception, "SIZE", 75)


# -- the network --------------------------------------------------------------------------------
def test_features_at_the_real_input_size_are_2048_values():
    assert inception.SIZE == 299
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = inception.InceptionV3()
    grey = _images(3)
    out = inception.features(net, grey, batch=2)  # two batches
    assert out.shape == (3, 2048) and out.dtype == np.float64 and np.isfinite(out).all()
    assert (out >= 0).all()  # means of ReLU outputs
    # Grey is the same image in three channels; one image alone gives its own features.
    assert np.allclose(inception.features(net, grey.expand(-1, 3, -1, -1)), out, atol=1e-6)
    assert np.allclose(inception.features(net, grey[1:2]), out[1:2], atol=1e-6)
    assert not np.allclose(out[0], out[1])
    assert not net.training


def test_prepare_resizes_bilinearly_to_minus_one_one():
    x = _images(2, 3, 20)
    prepared = inception.prepare(x)
    assert prepared.shape == (2, 3, 299, 299)
    assert prepared.min() >= -1 and prepared.max() <= 1
    expected = torch.nn.functional.interpolate(x, (299, 299), mode="bilinear") * 2 - 1
    assert torch.allclose(prepared, expected)
    # White is 1, black -1, grey in three equal channels.
    assert torch.allclose(inception.prepare(torch.ones(1, 1, 8, 8)), torch.ones(1, 3, 299, 299))
    assert torch.allclose(inception.prepare(torch.zeros(1, 1, 8, 8)), -torch.ones(1, 3, 299, 299))
    with pytest.raises(ValueError, match="expected images"):
        inception.prepare(torch.zeros(1, 2, 8, 8))


def test_state_dict_is_the_published_files():
    state = inception.InceptionV3().state_dict()
    assert len(state) == PUBLISHED_TENSORS == 472
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not [k for k in state if "num_batches_tracked" in k or "AuxLogits" in k]
    learnable = sum(p.numel() for p in inception.InceptionV3().parameters())
    assert learnable == PUBLISHED_PARAMETERS == 23_850_960


def test_mixed_blocks_pool_as_tensorflow_did():
    # A, C and the first E take means over the pixels inside the image (count_include_pad
    # False); the last E takes maxima. A corner pixel's mean of four ones is 1, not 4/9.
    net = inception.InceptionV3()
    assert not net.Mixed_7b.max_pool and net.Mixed_7c.max_pool
    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(inception._mean_pool(x), x)


@pytest.mark.parametrize(
    "block, pool", [("Mixed_5b", "mean"), ("Mixed_6b", "mean"), ("Mixed_7b", "mean"),
                    ("Mixed_7c", "max")],
)  # fmt: skip
def test_each_mixed_blocks_pool_branch_pools_as_tensorflow_did(block, pool):
    """The block's last channels are its pool branch applied to a 3x3 pooling over the pixels
    inside the image, pooled here by hand (torchvision's count_include_pad would differ at the
    border, which is not zero here)."""
    torch.manual_seed(0)
    b = getattr(inception.InceptionV3().eval(), block)
    x = torch.randn(1, b.branch_pool.conv.in_channels, 5, 5) + 3
    pooled = torch.empty_like(x)
    for i in range(5):
        for j in range(5):
            window = x[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            pooled[:, :, i, j] = window.amax((2, 3)) if pool == "max" else window.mean((2, 3))
    with torch.no_grad():
        out, expected = b(x), b.branch_pool(pooled)
    k = b.branch_pool.conv.out_channels
    assert torch.allclose(out[:, -k:], expected, atol=1e-5)


# -- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random.pth", "random.safetensors"])
def test_saved_weights_load_back_and_give_identical_features(weights, name, small_input):
    state, folder = weights
    net = inception.load(folder / name)
    assert not net.training
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    reference = inception.InceptionV3()
    reference.load_state_dict(state, strict=True)
    x = _images(2)
    assert np.array_equal(inception.features(net, x), inception.features(reference, x))


def test_legacy_and_torchvision_style_files_load(weights, tmp_path):
    # The 2019 file predates torch's zip format; torchvision's state dicts add step counters.
    state, _ = weights
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    counters = {k.replace("running_mean", "num_batches_tracked"): torch.tensor(0)
                for k in state if k.endswith("running_mean")}  # fmt: skip
    torch.save({**state, **counters}, tmp_path / "counted.pt")
    half = {k: v.half() for k, v in state.items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    for name in ("legacy.pth", "counted.pt"):
        loaded = inception.load(tmp_path / name).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert inception.load(tmp_path / "half.safetensors").fc.weight.dtype == torch.float32


def _bad_files(state: dict[str, torch.Tensor], folder) -> dict[str, str]:
    """File name -> what its one-line error says."""
    (folder / "garbage.pth").write_bytes(b"not a pickle, not a zip")
    (folder / "empty.pth").write_bytes(b"")
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    torch.save(torch.zeros(3), folder / "tensor.pth")
    torch.save({"weights": state["fc.bias"], "epoch": 3}, folder / "mixed.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, folder / "m.pth")
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, folder / "aux.pth")
    torch.save({**state, "fc.weight": torch.zeros(1000, 2048)}, folder / "shape.pth")
    save_file({"fc.bias": state["fc.bias"]}, str(folder / "one.safetensors"))
    (folder / "weights.ckpt").write_bytes(b"")
    return {
        "absent.pth": "no such file",
        "garbage.pth": "not readable as a state dict",
        "empty.pth": r"not readable as a state dict \(EOFError\)",
        "garbage.safetensors": "not readable as a state dict",
        "tensor.pth": "holds a Tensor, not a state dict",
        "mixed.pth": r"non-tensor entries \('epoch': int\)",
        "m.pth": r"45 missing key\(s\) \(Mixed_7c.branch1x1.bn.bias, .*, .* and 42 more\)",
        "aux.pth": r"1 unexpected key\(s\) \(AuxLogits.fc.weight\)",
        "shape.pth": r"wrong shape: fc.weight \(1000, 2048\) instead of \(1008, 2048\)",
        "one.safetensors": r"471 missing key\(s\)",
        "weights.ckpt": "unknown file type '.ckpt'",
    }


def test_each_bad_file_is_one_line_naming_it(weights, tmp_path):
    state, _ = weights
    for name, says in _bad_files(state, tmp_path).items():
        with pytest.raises(CheckpointError, match=says) as err:
            inception.load(tmp_path / name)
        message = str(err.value)
        assert "\n" not in message and message.startswith(str(tmp_path / name)), message
        assert "pt_inception-2015-12-05-6726825d.pth" in message


class _Trap:
    """Unpickling this would create a file: the proof that no code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_other_objects_is_refused_unopened(weights, tmp_path):
    state, _ = weights
    marker = tmp_path / "unpickled"
    torch.save({**state, "trap": _Trap(str(marker))}, tmp_path / "trap.pth")
    with open(tmp_path / "plain.pth", "wb") as f:  # a plain pickle, not torch.save's format
        pickle.dump({"fc.bias": _Trap(str(marker))}, f, protocol=2)
    for name in ("trap.pth", "plain.pth"):
        with pytest.raises(CheckpointError, match=r"objects other than tensors \(io.open\)") as err:
            inception.load(tmp_path / name)
        assert "\n" not in str(err.value) and "weights_only=True" in str(err.value)
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(_Trap(str(marker)))) and marker.exists()  # the trap works


# -- vaelab quality --inception-weights ---------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_inception")
    cfg = tiny_config("model.latent_dim=4", "train.epochs=1", "train.batch_size=256")
    return vaelab.train(cfg, out / "vae")


def test_quality_with_inception_weights_from_the_cli(run, weights, tmp_path, monkeypatch,
                                                     capsys, small_input):  # fmt: skip
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quality, "CLASSIFIER_STEPS", 50)
    path = weights[1] / "random.safetensors"
    assert main(["quality", str(run), "--images", "12", "--quiet",
                 "--inception-weights", str(path)]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert "FID (Inception)" in shown and "FID (classifier)" in shown
    assert "not pt_inception-2015-12-05-6726825d.pth, so not the standard FID" in shown
    result = json.loads((run / "eval" / "quality_val.json").read_text())
    assert result["inception_weights"] == {
        "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "features": 2048,
    }  # fmt: skip
    entries = [*result["samplers"].values(), result["train_vs_held_out"]]
    assert set(result["samplers"]) == {"prior", "gmm"}
    for entry in entries:
        assert {"fid_classifier", "kid_classifier", "kid_std"} <= set(entry)
        assert entry["fid_inception"] > 0 and entry["kid_inception_std"] >= 0
        assert np.isfinite(entry["kid_inception"])
        assert entry["fid_inception"] != entry["fid_classifier"]
    # The same numbers as the distances of the features themselves.
    net = inception.load(path)
    train_images, held = run_split(run, "train"), run_split(run)
    spread = np.linspace(0, len(held) - 1, 12).round().astype(np.int64)
    real = inception.features(net, held.batch(spread))
    pick = np.sort(np.random.default_rng(quality.SEED).choice(len(train_images), 12, replace=False))
    floor = inception.features(net, train_images.batch(pick))
    assert result["train_vs_held_out"]["fid_inception"] == pytest.approx(
        quality.frechet_distance(floor, real), rel=1e-9
    )
    # Without the flag: the classifier's numbers only, as before.
    assert main(["quality", str(run), "--images", "12", "--quiet"]) == 0
    again = json.loads((run / "eval" / "quality_val.json").read_text())
    assert "inception_weights" not in again and "fid_inception" not in again["train_vs_held_out"]


def test_one_quality_call_computes_the_real_images_inception_features_once(
    run, weights, tmp_path, monkeypatch, small_input
):
    """Two runs on the same data: the held-out and training images' Inception features are
    computed for the first run and given again for the second (only its samples are new), and
    both runs get the same train-vs-held-out distance."""
    import shutil

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quality, "CLASSIFIER_STEPS", 50)
    second = tmp_path / "second"
    shutil.copytree(run, second)
    sizes = []
    compute = inception.features

    def counted(net, images, *args, **kwargs):
        sizes.append(len(images))
        return compute(net, images, *args, **kwargs)

    monkeypatch.setattr(inception, "features", counted)
    path = weights[1] / "random.safetensors"
    assert main(["quality", str(run), str(second), "--images", "12", "--quiet",
                 "--inception-weights", str(path)]) == 0  # fmt: skip
    # run 1: held-out, training, prior and gmm samples; run 2: its two samplers only
    assert sizes == [12] * 6
    first, again = (
        json.loads((r / "eval" / "quality_val.json").read_text()) for r in (run, second)
    )
    assert first["train_vs_held_out"] == again["train_vs_held_out"]


def test_a_bad_weights_file_stops_quality_before_any_work(run, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("worked before checking the weights file")

    monkeypatch.setattr(quality, "classifier", never)
    monkeypatch.setattr(quality, "load", never)
    (tmp_path / "w.pth").write_bytes(b"junk")
    for bad in (tmp_path / "absent.pth", tmp_path / "w.pth"):
        assert main(["quality", str(run), "--inception-weights", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err
    with pytest.raises(CheckpointError, match="no such file"):  # the library checks it first too
        quality.sample_quality(run, None, None, inception_weights=tmp_path / "absent.pth")


def test_the_report_shows_inception_rows_only_when_measured():
    entry = {"fid_classifier": 1.5, "kid_classifier": 0.01, "kid_std": 0.001}
    inc = {"fid_inception": 123.5, "kid_inception": 0.125, "kid_inception_std": 0.01}
    plain = {"samplers": {"prior": entry}, "train_vs_held_out": entry, "num_images": 10}
    page = _quality_section(["a"], [plain])
    assert "FID (classifier)" in page and "Inception" not in page.replace("Inception FIDs", "")
    both = {"samplers": {"prior": {**entry, **inc}}, "train_vs_held_out": {**entry, **inc},
            "num_images": 10, "inception_weights": {"sha256": "ab" * 32}}  # fmt: skip
    page = _quality_section(["a", "b"], [both, plain])
    assert "FID (Inception), prior samples" in page and "123.5" in page
    assert "abababababab" in page and "6726825d" in page
