"""cvae (Sohn et al. 2015) and vaelab.conditions.

The objective is recomputed here from the networks' weights with the condition built by hand
(extra constant image channels for the encoder, one-hot inputs beside z for the decoder), the
Gaussian likelihood and the closed-form KL written out in float64; the conditions are read,
parsed and drawn as the data has them; and a run trained on labelled digits records its
condition variables, evaluates log p(x | y), and samples under `--condition label=k`.
"""

import math

import numpy as np
import pytest
import torch

import vaelab
from tests.conftest import tiny_config
from vaelab import conditions
from vaelab.cli import main
from vaelab.config import ConfigError
from vaelab.data import ImageDataset, Splits
from vaelab.data.synthetic import celeba_name, write_images
from vaelab.evaluate import evaluate
from vaelab.models import build
from vaelab.models.cvae import CVAE

SHAPE = (1, 8, 8)


def make(*overrides: str, spec: str = "[label:3,colour:2]") -> CVAE:
    torch.manual_seed(0)
    cfg = tiny_config("model.name=cvae", f"model.conditions={spec}", *overrides).model
    return build(cfg, SHAPE).double().eval()


def labelled_splits(n_train: int = 64, n_val: int = 32, seed: int = 0) -> Splits:
    """Random 8x8 images with labels 0..3 and two -1/1 attributes."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(n) % 4
    attributes = {"Smiling": np.where(labels % 2, 1, -1), "Male": rng.choice([-1, 1], n)}
    full = ImageDataset(images, labels, attributes=attributes)
    return Splits(full.subset(np.arange(n_train)), full.subset(np.arange(n_train, n)))


@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_the_objective_is_the_conditional_elbo_computed_by_hand(net):
    model = make(f"model.net={net}", "model.widths=[8]" if net == "mlp" else "model.widths=[4,8]")
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    y = torch.tensor([[0, 1], [1, 0], [2, 1], [2, 0], [0, 0]])
    onehot = torch.zeros(5, 5, dtype=torch.float64)  # label: columns 0-2, colour: 3-4
    for i, (label, colour) in enumerate(y.tolist()):
        onehot[i, label] = onehot[i, 3 + colour] = 1.0
    planes = onehot[:, :, None, None] * torch.ones(5, 5, 8, 8, dtype=torch.float64)
    stats = model.encoder(torch.cat([x, planes], 1))
    mu, logvar = stats[:, :2], stats[:, 2:]
    torch.manual_seed(3)
    with model.given(y):
        out = model(x)
        torch.manual_seed(3)
        z = model.encode(x).rsample(1)[0]  # the draw the forward pass made
    mean = torch.sigmoid(model.decoder(torch.cat([z, onehot], 1))).reshape(5, -1)
    sigma2 = model.cfg.sigma2
    sse = ((x.reshape(5, -1) - mean) ** 2).sum(1)
    nll = sse / (2 * sigma2) + 0.5 * 64 * math.log(2 * math.pi * sigma2)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    diffs = [
        (out.terms["recon"] - sse / (2 * sigma2)).abs().max().item(),
        (out.terms["kl"] - kl).abs().max().item(),
        (out.elbo - (-nll - kl)).abs().max().item(),
        (out.loss - (sse / (2 * sigma2) + kl)).abs().max().item(),
        (out.posterior.mu - mu).abs().max().item(),
    ]
    print("cvae objective vs hand computation, max |diff|:", max(diffs))
    assert max(diffs) < 1e-12, diffs


def test_the_condition_changes_what_is_decoded_and_encoded():
    model = make()
    z = torch.randn(2, 2, dtype=torch.float64)
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    with model.given(torch.tensor([[0, 0], [0, 0]])):
        a, qa = model.decode(z), model.encode(x).mu
    with model.given(torch.tensor([[2, 1], [2, 1]])):
        b, qb = model.decode(z), model.encode(x).mu
    assert (a - b).abs().max() > 1e-6 and (qa - qb).abs().max() > 1e-6
    with model.given(torch.tensor([[0, 0], [0, 0]])):
        assert torch.equal(model.decode(z), a)  # the condition, not leftover state
    assert model._y is None  # given() restores what was there


def test_a_bad_condition_is_refused():
    model = make()
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="no condition given"):
        model(x)
    with pytest.raises(ValueError, match=r"integer indices \(B, 2\)"):
        model.given(torch.zeros(2, 3, dtype=torch.long)).__enter__()
    with pytest.raises(ValueError, match="out of range"):
        model.given(torch.tensor([[3, 0], [0, 0]])).__enter__()
    three = model.given(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="for 3 images, the batch has 2"), three:
        model(x)
    with pytest.raises(ConfigError, match="model.conditions"):
        build(tiny_config("model.name=cvae").model, SHAPE)  # nothing filled in
    with pytest.raises(ConfigError, match="model.conditions"):
        tiny_config("model.name=cvae", "model.conditions=[label]")
    with pytest.raises(ConfigError, match="model.condition_on"):
        tiny_config("model.name=cvae", "model.condition_on=colour")
    flipped = tiny_config("model.name=cvae", "model.condition_on=factors", "data.flip=true")
    with pytest.raises(ConfigError, match="'data.flip': a flipped image no longer has"):
        CVAE.check_run(flipped, 1)
    with model.given(torch.tensor([[1, 0], [2, 1]], dtype=torch.int32)):  # any integer type
        assert model.decode(torch.zeros(2, 2, dtype=torch.float64)).shape == (2, *SHAPE)


def test_variables_indices_and_the_spec_come_from_the_data():
    train = labelled_splits().train
    assert conditions.variables(train, "label") == (("label", 4),)
    assert conditions.variables(train, "attributes") == (("Smiling", 2), ("Male", 2))
    ys = conditions.indices(train, "attributes", np.array([0, 1, 2]))
    assert ys[:, 0].tolist() == [0, 1, 0]  # -1 in the data is 0, 1 is 1
    assert conditions.parse_spec(conditions.spec((("label", 4),))) == (("label", 4),)
    with pytest.raises(ConfigError, match="model.condition_on': the data has no factors; "):
        conditions.variables(train, "factors")
    identities = ImageDataset(np.zeros((3, 8, 8, 1), np.uint8), np.array([5, -1, 2000]))
    with pytest.raises(ConfigError, match="not classes to condition on .* CelebA's are identit"):
        conditions.variables(identities, "label")  # CelebA's labels: identities, -1 unknown
    bare = ImageDataset(np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ConfigError, match="carry no labels"):
        conditions.variables(bare, "label")


def test_condition_options_are_parsed_with_one_line_errors():
    known = (("label", 10), ("Smiling", 2))
    assert conditions.parse(["label=7", "Smiling=1"], known) == {0: 7, 1: 1}
    assert conditions.parse(["Smiling=-1"], known) == {1: 0}
    for bad, message in [
        ("label=10", "from 0 to 9 for label"),
        ("label=seven", "from 0 to 9 for label"),
        ("Age=3", "NAME one of: label, Smiling"),
        ("label", "NAME one of"),
        ("label=7\n", "from 0 to 9"),  # a plain integer only
        ("label= 7", "from 0 to 9"),
        ("label=\u0667", "from 0 to 9"),  # an Arabic-Indic seven: int() would take it
    ]:
        with pytest.raises(ConfigError, match=message):
            conditions.parse([bad], known)
    with pytest.raises(ConfigError, match="label=3: label is given a value twice"):
        conditions.parse(["label=7", "label=3"], known)
    # what a user sent is echoed on one short line
    for bad in ["a\nb=1", "label=" + "9" * 5000]:
        with pytest.raises(ConfigError) as refused:
            conditions.parse([bad], known)
        assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


def test_drawn_conditions_hold_the_fixed_values_and_follow_the_data_otherwise():
    train = labelled_splits(400, 4).train
    y = conditions.draw(train, "attributes", 100, {0: 1}, seed=1).numpy()
    assert (y[:, 0] == 1).all()
    table = conditions.indices(train, "attributes", slice(None))
    assert set(map(tuple, y)) <= set(map(tuple, table[table[:, 0] == 1]))
    assert 0.3 < y[:, 1].mean() < 0.7  # Male is independent of Smiling in this data
    assert torch.equal(conditions.draw(train, "label", 8, seed=2), conditions.draw(
        train, "label", 8, seed=2))  # fmt: skip
    with pytest.raises(ConfigError, match="no image of the data has these values"):
        conditions.draw(train, "label", 4, {0: 9})


def test_the_typical_condition_is_each_variables_most_common_value():
    """Labels 0..3 with 2 the most common, Smiling present in 3 of 5: (2, 1); no data: zeros."""
    images = np.zeros((5, 8, 8, 1), np.uint8)
    labels = np.array([2, 2, 1, 3, 2])
    attributes = {"Smiling": np.array([1, 1, -1, 1, -1]), "Male": np.array([-1, -1, -1, 1, 1])}
    data = ImageDataset(images, labels, attributes=attributes)
    assert conditions.typical(data, (("label", 4),), "label") == [2]
    known = (("Smiling", 2), ("Male", 2))
    assert conditions.typical(data, known, "attributes") == [1, 0]
    assert conditions.typical(None, known, "attributes") == [0, 0]


def test_training_records_the_variables_and_resuming_on_other_data_is_refused(tmp_path):
    data = labelled_splits()
    run = tmp_path / "run"
    vaelab.train(tiny_config("model.name=cvae", "train.epochs=1"), run, splits=data)
    model = vaelab.load(run)
    assert model.conditions == (("label", 4),)
    assert "conditions:\n  - label:4" in (run / "config.yaml").read_text()
    fewer = Splits(*(ImageDataset(s.images[s.rows], s.labels % 2) for s in (data.train, data.val)))
    with pytest.raises(ConfigError, match=r"says \['label:4'\], but the data has \['label:2'\]"):
        vaelab.resume(run, ["train.epochs=2"], splits=fewer)
    with pytest.raises(ConfigError, match=r"says \['label:4'\], but the data has \['label:2'\]"):
        evaluate(run, "val", 3, progress=False, splits=fewer)  # a loaded run meets other labels
    result = evaluate(run, "val", 3, progress=False, splits=data)
    assert math.isfinite(result["iw_nll_nats"]) and math.isfinite(result["diversity_ratio"])
    # the pass gives each image its own label: evaluating with the labels shifted differs
    shifted = Splits(
        data.train, ImageDataset(data.val.images[data.val.rows], (data.val.labels + 1) % 4)
    )
    other = evaluate(run, "val", 3, progress=False, splits=shifted)
    assert other["elbo_nats"] != result["elbo_nats"]


def test_sample_with_a_condition_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_config("model.name=cvae", "data.subset=200", "train.epochs=1")
    vaelab.train(cfg, run)
    out = tmp_path / "seven.png"
    assert main(["sample", str(run), "--out", str(out), "-n", "8", "--condition", "label=7"]) == 0
    assert out.stat().st_size > 0
    assert main(["sample", str(run), "--out", str(out), "--condition", "label=10"]) == 2
    assert "--condition label=10: expected an integer from 0 to 9" in capsys.readouterr().err
    plain = tmp_path / "plain"
    vaelab.train(tiny_config("data.subset=200", "train.epochs=1"), plain)
    assert main(["sample", str(plain), "--out", str(tmp_path / "p.png"), "--condition",
                 "label=7"]) == 2  # fmt: skip
    assert "model 'vae' is not conditional" in capsys.readouterr().err


def test_a_celeba_run_conditioned_on_attributes_samples_smiling_faces_on_demand(tmp_path, capsys):
    """The issue's `--condition Smiling=1` end to end, on a CelebA folder of synthetic photos
    with an attribute file: train, then sample with one attribute held."""
    root = tmp_path / "CelebA"
    numbers = range(1, 25)
    write_images(root / "img_align_celeba", [celeba_name(n) for n in numbers], size=(40, 48))
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{celeba_name(n)} {0 if n <= 20 else 1}\n" for n in numbers)
    )
    rows = [f"{celeba_name(n)} {1 if n % 2 else -1} {1 if n % 3 else -1}\n" for n in numbers]
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\nSmiling Male\n" + "".join(rows))
    run = tmp_path / "run"
    cfg = tiny_config(
        "model.name=cvae", "model.condition_on=attributes", "data.name=celeba",
        f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.size=16",
        "data.crop=32", "train.batch_size=8", "train.epochs=1",
    )  # fmt: skip
    vaelab.train(cfg, run)
    assert vaelab.load(run).conditions == (("Smiling", 2), ("Male", 2))
    out = tmp_path / "smiling.png"
    assert main(["sample", str(run), "--out", str(out), "-n", "8", "--condition", "Smiling=1",
                 "--condition", "Male=-1"]) == 0  # fmt: skip
    assert out.stat().st_size > 0
    assert main(["sample", str(run), "--out", str(out), "--condition", "Age=1"]) == 2
    assert "NAME one of: Smiling, Male" in capsys.readouterr().err
