"""Hostile runs: damaged or tampered weights, config.json, resume state and sweep.json, read-only
runs, and outputs that would replace a run's own files or a user's. Each case ends in one line
naming the file (or key, or option), exit code 2, and no file written or changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.hostile.conftest import assert_refused, assert_unchanged, run_cli, snapshot

STATE = Path("state") / "train_state.safetensors"


def _rewrite(path: Path, tensors=None, metadata=None) -> None:
    """Rewrite a safetensors file with changed tensors and/or metadata."""
    with safe_open(path, framework="pt") as f:
        old_meta = f.metadata() or {}
    old = load_file(path)
    save_file(
        old if tensors is None else tensors(old),
        path,
        old_meta if metadata is None else metadata(old_meta),
    )


def _set_json(path: Path, **changes) -> None:
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))


# -- weights and config.json -------------------------------------------------------------------


def test_weights_holding_nan_are_refused_naming_the_tensor(run_copy, tmp_path):
    def poison(t):
        t["decoder.out.weight"][0, 0, 0, 0] = float("nan")
        return t

    _rewrite(run_copy / "model.safetensors", tensors=poison)
    before = snapshot(tmp_path)
    result = run_cli("evaluate", run_copy, "--iw-samples", "2", cwd=tmp_path)
    assert_refused(result, "model.safetensors", "decoder.out.weight", "NaN")
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"shape": [3, 100000, 100000]}, ["config.json"]),
        ({"shape": [-1, 28, 28]}, ["config.json", "'shape'"]),
        ({"model": "vae"}, ["config.json", "'model'"]),
        ({"model": {"name": "vae", "widths": [8, 16], "latent_dim": 2}}, ["model.safetensors"]),
        ({"model": {"name": "vae", "widths": [200000, 200000]}}, ["model.widths", "GB"]),
    ],
)
def test_a_tampered_config_json_is_refused_before_any_allocation(run_copy, tmp_path, change, words):
    _set_json(run_copy / "config.json", **change)
    before = snapshot(tmp_path)
    result = run_cli("sample", run_copy, "--out", "s.png", cwd=tmp_path)
    assert_refused(result, *words)
    assert_unchanged(before, tmp_path)


# -- resume state ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "words"),
    [
        ({"metadata": lambda m: {**m, "counters": "[1, 2]"}}, ["counters"]),
        ({"tensors": lambda t: {k: v for k, v in t.items() if k != "rng.torch"}}, ["rng.torch"]),
    ],
)
def test_a_tampered_resume_state_is_refused_naming_the_entry(run_copy, tmp_path, tamper, words):
    _rewrite(run_copy / STATE, **tamper)
    lock = "run/.vaelab.lock"  # the resuming process writes its pid into the run's lock
    before = {k: v for k, v in snapshot(tmp_path).items() if k != lock}
    result = run_cli("train", "--resume", run_copy, "train.epochs=2", cwd=tmp_path)
    assert_refused(result, "train_state.safetensors", *words)
    assert_unchanged(before, tmp_path, allowed=[lock])


# -- evaluate ----------------------------------------------------------------------------------


def test_evaluate_refuses_an_unwritable_eval_folder_before_any_work(run_copy, tmp_path):
    """run/eval is a file: refused before the model or the data are read (the data root is
    missing too; were the data read first, the message would name it)."""
    (run_copy / "eval").write_text("a user's notes\n")
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("root: ", "root: /nonexistent", 1))
    before = snapshot(tmp_path)
    result = run_cli("evaluate", run_copy, "--iw-samples", "2", cwd=tmp_path)
    assert_refused(result, "eval", "not a folder")
    assert_unchanged(before, tmp_path)


def test_evaluate_refuses_a_read_only_run_before_any_work(run_copy, tmp_path):
    os.chmod(run_copy, 0o555)
    try:
        if os.access(run_copy, os.W_OK):
            pytest.skip("this user can write into a read-only folder (root)")
        before = snapshot(tmp_path)
        result = run_cli("evaluate", run_copy, "--iw-samples", "2", cwd=tmp_path)
        assert_refused(result, "eval", "not writable")
        assert_unchanged(before, tmp_path)
    finally:
        os.chmod(run_copy, 0o755)


def test_evaluate_says_what_it_will_compute_when_not_on_a_terminal(run_copy, tmp_path):
    result = run_cli("evaluate", run_copy, "--iw-samples", "3", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    assert any("K = 3" in line and "images" in line for line in result.lines), result.stderr
    assert "\r" not in result.stderr  # no progress bar frames in a log
    assert (run_copy / "eval" / "val.json").is_file()


# -- outputs -----------------------------------------------------------------------------------


def test_an_output_never_replaces_a_run_file_or_a_users_file(run_copy, tmp_path):
    (tmp_path / "mine.png").write_bytes(b"\x89PNG\r\n\x1a\n a user's picture")
    before = snapshot(tmp_path)
    out = run_copy / "model.safetensors"
    assert_refused(run_cli("sample", run_copy, "--out", out, cwd=tmp_path), "model.safetensors")
    assert_refused(run_cli("sample", run_copy, "--out", "mine.png", cwd=tmp_path), "mine.png")
    assert_unchanged(before, tmp_path)


def test_a_rerun_replaces_vaelabs_own_picture(run_copy, tmp_path):
    first = run_cli("sample", run_copy, "--out", "s.png", "-n", "8", cwd=tmp_path)
    assert first.code == 0, first.stderr[-3000:]
    again = run_cli("sample", run_copy, "--out", "s.png", "-n", "16", cwd=tmp_path)
    assert again.code == 0, again.stderr[-3000:]


@pytest.mark.parametrize("runs", [["../outside"], ["/etc"]], ids=["up", "absolute"])
def test_a_tampered_sweep_json_cannot_point_outside_the_sweep(tmp_path, runs):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"axes": {"model.beta": [1, 2]}, "runs": runs}))
    before = snapshot(tmp_path)
    result = run_cli("report", sweep, "--out", "r.html", cwd=tmp_path)
    assert_refused(result, "sweep.json", "folder name")
    assert_unchanged(before, tmp_path)
