"""Hostile config input on the command line: YAML files a careless hand wrote, and options a
model would ignore. Each case ends in one line naming the key or file, exit code 2, and no file
written or changed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.hostile.conftest import TINY, assert_refused, assert_unchanged, run_cli, snapshot


def _train(cwd: Path, *items: str) -> tuple[dict[str, str], object]:
    """`vaelab train ITEMS --out r` in ``cwd`` (a snapshot of cwd taken before it)."""
    before = snapshot(cwd)
    return before, run_cli("train", *items, "--out", "r", cwd=cwd)


def test_a_yaml_float_in_exponent_form_is_a_number(tmp_path):
    """`lr: 1e-3` is a float in YAML 1.2 and on the command line; PyYAML's YAML 1.1 resolver
    read it as the text '1e-3' and the config refused it."""
    (tmp_path / "cfg.yaml").write_text(
        "train:\n  lr: 1e-3\n  batch_size: 64\nmodel:\n  sigma2: .25\n"
    )
    result = run_cli("config", "cfg.yaml", "--json", cwd=tmp_path)
    assert result.code == 0, result.stderr
    cfg = json.loads(result.stdout)
    assert cfg["train"]["lr"] == 0.001
    assert cfg["model"]["sigma2"] == 0.25


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train:\n  lr: 0.1\n  lr: 0.2\n", ["duplicate key 'train.lr'", "lines 2 and 3"]),
        (
            "train:\n  lr: 0.1\nmodel:\n  latent_dim: 4\ntrain:\n  epochs: 2\n",
            ["'train'", "1 and 5"],
        ),
    ],
)
def test_a_duplicate_yaml_key_is_refused_with_its_lines(tmp_path, digits_csv, text, words):
    (tmp_path / "cfg.yaml").write_text(text)
    before, result = _train(tmp_path, "cfg.yaml", f"data.root={digits_csv}", *TINY)
    assert_refused(result, "cfg.yaml", *words)
    assert_unchanged(before, tmp_path)


def test_a_config_file_that_is_not_utf8_or_a_folder_is_refused(tmp_path):
    (tmp_path / "cfg.yaml").write_bytes(b"train:\n  lr: 0.1\n# caf\xe9 \xff\n")
    (tmp_path / "configs").mkdir()
    before = snapshot(tmp_path)
    assert_refused(run_cli("train", "cfg.yaml", "--out", "r", cwd=tmp_path), "cfg.yaml", "UTF-8")
    assert_refused(run_cli("config", "configs", cwd=tmp_path), "'configs'", "folder")
    assert_unchanged(before, tmp_path)


def test_a_yaml_syntax_error_is_one_line_with_its_line_number(tmp_path):
    (tmp_path / "cfg.yaml").write_text("train:\n  lr: [0.1, 0.2\n  epochs: 3\n")
    last = assert_refused(run_cli("config", "cfg.yaml", cwd=tmp_path), "cfg.yaml", "line")
    assert re.search(r"line \d+", last)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.likelihood=bernoulli", "model.sigma2=0.1"], "model.sigma2"),
        (["model.name=sigma_vae", "model.sigma2=0.1"], "model.sigma2"),
        (["model.name=decoder_only", "model.free_bits=0.5"], "model.free_bits"),
        (["model.name=decoder_only", "model.likelihood=bernoulli"], "model.likelihood"),
        (["model.name=iwae", "model.free_bits=0.5"], "model.free_bits"),
    ],
)
def test_an_option_the_model_would_ignore_is_refused(tmp_path, digits_csv, overrides, key):
    before, result = _train(tmp_path, f"data.root={digits_csv}", *TINY, *overrides)
    assert_refused(result, key)
    assert_unchanged(before, tmp_path)


def test_a_model_too_large_for_the_memory_is_refused_before_training(tmp_path, digits_csv):
    before, result = _train(
        tmp_path, f"data.root={digits_csv}", *TINY, "model.widths=[200000,200000]"
    )
    assert_refused(result, "model.widths", "GB")
    assert_unchanged(before, tmp_path)
