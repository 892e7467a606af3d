import json
import re
from pathlib import Path

import pytest

from vaelab.cli import main
from vaelab.config import ConfigError
from vaelab.sweep import parse_axes, plan
from vaelab.trainer import read_metrics

FAST = ["model.net=mlp", "model.widths=[256]", "model.latent_dim=8", "train.progress=false"]


def test_axes_and_fixed_values():
    axes, fixed = parse_axes(["model.beta=1,2,4", "model.widths=[8,16]", "train.epochs=2"])
    assert axes == [("model.beta", ["1", "2", "4"])]
    assert fixed == ["model.widths=[8,16]", "train.epochs=2"]
    info, runs = plan(None, ["model.name=beta_vae", "model.beta=1,4", "model.latent_dim=2,3"])
    assert info["axes"] == {"model.beta": ["1", "4"], "model.latent_dim": ["2", "3"]}
    assert [name for name, _ in runs] == [
        "model.beta=1_model.latent_dim=2", "model.beta=1_model.latent_dim=3",
        "model.beta=4_model.latent_dim=2", "model.beta=4_model.latent_dim=3",
    ]  # fmt: skip
    assert runs[3][1].model.beta == 4.0 and runs[3][1].model.latent_dim == 3
    with pytest.raises(ConfigError, match="at least one key=v1,v2"):
        parse_axes(["model.beta=4"])


def test_every_config_is_checked_before_the_first_run(tmp_path):
    with pytest.raises(ConfigError, match="'model.beta': expected a finite number >= 0"):
        plan(None, ["model.name=beta_vae", "model.beta=1,-1"])
    assert main(["sweep", "--out", str(tmp_path / "s"), "model.bta=1,2"]) == 2
    assert not (tmp_path / "s").exists()


def test_beta_sweep_on_mnist5k_trades_kl_for_reconstruction(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "model.name=beta_vae", "model.beta=0.5,2,8", *FAST]
    assert main([*args, "train.epochs=2"]) == 0
    info = json.loads((out / "sweep.json").read_text())
    assert info["runs"] == ["model.beta=0.5", "model.beta=2", "model.beta=8"]
    last = [read_metrics(out / name)[-1] for name in info["runs"]]
    kls, recons = [r["kl"] for r in last], [r["recon"] for r in last]
    assert kls[0] > kls[1] > kls[2]  # KL falls as beta grows
    assert recons[0] < recons[2]  # and reconstruction gets worse
    # Again: finished runs are skipped, not retrained.
    stamps = [(out / n / "model.safetensors").stat().st_mtime_ns for n in info["runs"]]
    assert main([*args, "train.epochs=2"]) == 0
    assert stamps == [(out / n / "model.safetensors").stat().st_mtime_ns for n in info["runs"]]
    # The report of the sweep has the rate-distortion figure and every run.
    page_path = tmp_path / "r.html"
    assert main(["report", str(out), "--out", str(page_path), "--iw-samples", "2", "--quiet"]) == 0
    page = page_path.read_text()
    assert re.search(r'alt="rate-distortion" src="data:image/png;base64,', page)
    assert all(name in page for name in info["runs"])


def test_interrupted_sweep_run_is_resumed(tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "model.latent_dim=2,3", *FAST, "train.epochs=1"]
    assert main(args) == 0
    # Make the second run look interrupted before its first epoch ended.
    run = out / "model.latent_dim=3"
    for name in ["model.safetensors", "metrics.jsonl", "state/train_state.safetensors"]:
        (run / name).unlink()
    assert main(args) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 1]
    assert main(["sweep", "--out", str(out), "model.latent_dim=4,5", *FAST]) == 2  # another sweep
    # The same axes with other fixed settings would keep runs trained with the old ones.
    assert main([*args[:-1], "train.epochs=3"]) == 2
    # A sweep still running: the report shows the runs that have finished an epoch.
    (run / "model.safetensors").unlink()
    page = tmp_path / "r.html"
    assert main(["report", str(out), "--out", str(page), "--iw-samples", "2", "--quiet"]) == 0
    assert "model.latent_dim=2" in page.read_text()


def test_sweep_values_keep_underscores():
    info, _ = plan(None, ["model.name=beta_vae,sigma_vae", "model.latent_dim=2,3"])
    assert info["values"]["model.name=sigma_vae_model.latent_dim=3"] == {
        "model.name": "sigma_vae",
        "model.latent_dim": "3",
    }


def test_a_sweep_is_the_same_when_its_runs_train_the_same(tmp_path, monkeypatch):
    from vaelab.sweep import same_sweep

    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text("train:\n  lr: 0.001\n")
    axes = ["model.latent_dim=2,3"]
    before, _ = plan("c.yaml", axes)
    assert same_sweep(json.loads(json.dumps(before)), plan("./c.yaml", axes)[0])  # path spelt
    Path("c.yaml").write_text("train:\n  lr: 0.01\n")  # the file edited between two runs
    assert not same_sweep(before, plan("c.yaml", axes)[0])
