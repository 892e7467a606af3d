import json
import subprocess
import sys

import pytest
from PIL import Image

import vaelab
from vaelab.cli import main
from vaelab.data.celeba import split_by_number
from vaelab.data.synthetic import celeba_name, write_images
from vaelab.trainer import read_metrics

FAST = ["model.net=mlp", "model.widths=[32]", "model.latent_dim=4", "train.progress=false"]


def test_train_then_resume_from_the_command_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: beta_vae\ntrain:\n  epochs: 1\n")
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), *FAST, "model.beta=2"]) == 0
    assert read_metrics(run)[-1]["epoch"] == 1
    assert "beta: 2.0" in (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 1, 2, 2]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "model.bta=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaelab: error: unknown config key 'model.bta'")
    assert err.count("\n") == 1
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "a vaelab run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_divergence_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from vaelab.models.vae import VAE

    original = VAE.forward

    def forward(self, x, ctx=None):
        out = original(self, x, ctx)
        return type(out)(**{**out.__dict__, "loss": out.loss * float("inf")})

    monkeypatch.setattr(VAE, "forward", forward)
    assert main(["train", "--out", str(tmp_path / "r"), *FAST, "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    # The loss is read every train.log_every steps (50): the first window is steps 1 to 35.
    assert err.startswith("vaelab: error: loss became nan at epoch 1, between steps 1 and 35;")
    assert err.count("\n") == 1


def test_console_script_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "vaelab", "config", "model.name=decoder_only", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["model"]["objective"] == "mse"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--iw-samples", "5", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"decoder_only", "vae", "beta_vae"}
    for name, s in summary.items():
        for key in ["diversity_ratio", "val_recon", "val_kl", "val_elbo_nats", "seconds"]:
            assert key in s
        assert (s["val_kl"] is None) == (name == "decoder_only")
        for fig in ["curves", "reconstructions", "samples"]:
            with Image.open(out / name / "figures" / f"{fig}.png") as img:
                assert img.width > 200 and img.height > 100
    assert "diversity" in capsys.readouterr().out
    for name, s in summary.items():  # the likelihood numbers keep their order
        assert s["iw_nll_nats"] <= -s["val_elbo_nats"] + 0.5
        assert name == "decoder_only" or s["elbo_gap_nats"] >= -0.5
    page = (out / "report.html").read_text()
    assert all(name in page for name in summary) and page.count("<img ") == 15


def test_prepare_then_train_on_a_celeba_folder(tmp_path, capsys):
    root = tmp_path / "CelebA"
    names = [celeba_name(n) for n in [*range(1, 25), 162771, 162772, 162773, 182638]]
    write_images(root / "img_align_celeba", names)
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{n} {split_by_number(n)}\n" for n in names)
    )
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    prepare = ["prepare", "celeba_vae", f"data.root={root}", cache, "--quiet"]  # a shipped name
    assert main(prepare) == 0
    out = capsys.readouterr().out
    assert "prepared 28 images (24 train, 3 val, 1 test; 0 files skipped)" in out
    assert "images/s" in out
    run = tmp_path / "run"
    args = ["train", "celeba_vae", f"data.root={root}", cache, "train.epochs=1", "train.device=cpu"]
    args += ["train.progress=false", "--out", str(run)]
    assert main(args) == 0
    for name in ["config.yaml", "config.json", "model.safetensors", "metrics.jsonl"]:
        assert (run / name).is_file()
    model = vaelab.load(run)
    assert model.shape == (3, 64, 64) and model.cfg.latent_dim == 128
    assert model.sample(2).shape == (2, 3, 64, 64)
