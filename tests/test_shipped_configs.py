"""The example configs ship inside the package and are named on the command line by name."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vaelab.cli import main
from vaelab.config import ConfigError, load_config, shipped_configs
from vaelab.sweep import plan

SRC = Path(__file__).resolve().parent.parent / "src"
# The files in the source tree: what the package data declaration has to carry.
SOURCE_YAMLS = sorted(p.stem for p in (SRC / "vaelab" / "configs").glob("*.yaml"))


def test_the_source_tree_has_the_configs():
    assert {"celeba_vae", "celeba_beta_vae", "celeba_decoder_only", "shapes_vae"} <= set(
        SOURCE_YAMLS
    )
    assert list(shipped_configs()) == SOURCE_YAMLS


@pytest.mark.parametrize("name", SOURCE_YAMLS)
def test_every_shipped_config_loads_by_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here: the name is the shipped config
    cfg = load_config(name)
    assert cfg.train.epochs >= 1
    text = shipped_configs()[name].read_text(encoding="utf-8")
    assert text.startswith("# ")  # the one-line description `vaelab config --list` shows
    assert f"vaelab train {name} " in text  # its usage line uses the name form


def test_a_name_resolves_to_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("celeba_beta_vae", ["train.epochs=2"])
    assert (cfg.data.name, cfg.model.name, cfg.model.beta) == ("celeba", "beta_vae", 4.0)
    assert cfg.model.latent_dim == 128 and cfg.train.epochs == 2


def test_an_existing_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("celeba_vae").write_text("train:\n  epochs: 7\n")
    cfg = load_config("celeba_vae")
    assert cfg.train.epochs == 7 and cfg.data.name == "mnist5k"  # the file, not the shipped one
    (tmp_path / "shapes_vae").mkdir()  # a folder of that name is the user's too: refused
    with pytest.raises(ConfigError, match="is a folder"):
        load_config("shapes_vae")


@pytest.mark.parametrize(
    ("argument", "words"),
    [
        ("celeb_vae", ["config 'celeb_vae'", "shipped: celeba_beta_vae, ", "shapes_vae"]),
        ("configs/celeba_vae.yaml", ["'configs/celeba_vae.yaml' not found", "celeba_vae"]),
        ("celeba_vae.yaml", ["'celeba_vae.yaml' not found", "give its name, celeba_vae"]),
        ("nothing/here.yaml", ["config file 'nothing/here.yaml' not found"]),
    ],
)
def test_an_unknown_name_or_missing_file_is_one_line(argument, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(argument)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_name_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in (["train", "celeb_vae", "--out", "run"], ["prepare", "celeb_vae"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("vaelab: error: config 'celeb_vae': no such file")
        assert all(name in err for name in SOURCE_YAMLS) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_sweeps_take_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info, runs = plan("shapes_beta_vae", ["model.beta=1,4"])
    assert info["config"] == "shapes_beta_vae"
    assert [cfg.model.beta for _, cfg in runs] == [1.0, 4.0]
    assert all(cfg.data.name == "shapes" and cfg.model.latent_dim == 10 for _, cfg in runs)


def test_config_list_names_every_shipped_config(capsys):
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SOURCE_YAMLS
    for line, name in zip(lines, SOURCE_YAMLS, strict=True):
        first = shipped_configs()[name].read_text(encoding="utf-8").splitlines()[0]
        assert line.endswith(first.lstrip("# "))
    assert main(["config", "--list", "celeba_vae"]) == 2
    assert "--list takes no config" in capsys.readouterr().err


def test_config_name_prints_the_shipped_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "celeba_vae"]) == 0
    out = capsys.readouterr().out
    assert out == shipped_configs()["celeba_vae"].read_text(encoding="utf-8")
    Path("copy.yaml").write_text(out)  # what a user copies loads as the shipped config does
    assert load_config("copy.yaml") == load_config("celeba_vae")
    # With overrides (or --json) it is the resolved config, every key
    assert main(["config", "celeba_vae", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "fused_adam: true" in out and not out.startswith("#")


def test_the_wheel_carries_the_configs(tmp_path):
    """A plain (non-editable) install has the YAMLs: build the wheel and read its file list."""
    shutil.copy(SRC.parent / "pyproject.toml", tmp_path)
    shutil.copy(SRC.parent / "README.md", tmp_path)
    shutil.copytree(SRC, tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    out = tmp_path / "dist"
    subprocess.run([*pip, "-q", "-w", str(out), str(tmp_path)], check=True, capture_output=True)
    (wheel,) = out.glob("vaelab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"vaelab/configs/{name}.yaml" for name in SOURCE_YAMLS} <= names
    assert "vaelab/configs/__init__.py" in names
