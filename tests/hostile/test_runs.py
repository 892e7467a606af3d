"""Run directories under careless and hostile use: nothing of the user's is overwritten or
deleted, nothing is written outside the folder given, and an interrupted run resumes exactly."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.hostile.conftest import (
    TINY,
    assert_refused,
    assert_unchanged,
    run_cli,
    snapshot,
)


def weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(run / "model.safetensors")


# -- a new run never lands on the user's files -------------------------------------------------
@pytest.mark.parametrize(
    "files",
    [
        {"config.json": "{}", "metrics.jsonl": "mine\n"},
        {"model.safetensors": "my weights"},
        {"state/train_state.safetensors": "mine", "notes.txt": "hello"},
    ],
    ids=["config-metrics", "weights", "state"],
)
def test_train_refuses_a_folder_holding_the_users_files(tmp_path, digits_csv, files):
    out = tmp_path / "out"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(tmp_path)
    result = run_cli("train", "--out", "out", f"data.root={digits_csv}", *TINY, cwd=tmp_path)
    assert_refused(result, "'out' is not empty", "choose another --out")
    assert_unchanged(before, tmp_path)


def test_train_into_an_empty_string_is_refused(tmp_path, digits_csv):
    (tmp_path / "config.yaml").write_text("mine: 1\n")
    before = snapshot(tmp_path)
    result = run_cli("train", "--out", "", f"data.root={digits_csv}", *TINY, cwd=tmp_path)
    assert_refused(result, "--out", "empty")
    assert_unchanged(before, tmp_path)


def test_train_over_a_file_or_a_run_is_refused(tmp_path, run_copy, digits_csv):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    result = run_cli("train", "--out", "afile", f"data.root={digits_csv}", *TINY, cwd=tmp_path)
    assert_refused(result, "not a folder")
    result = run_cli("train", "--out", "run", f"data.root={digits_csv}", *TINY, cwd=tmp_path)
    assert_refused(result, "already holds a run", "--resume")
    assert_unchanged(before, tmp_path)


def test_resume_removes_only_vaelabs_own_temporaries(tmp_path, run_copy):
    mine = [
        run_copy / ".notes.tmp",
        run_copy / "state" / ".backup.tmp",
        run_copy / "figures" / ".draft.png.tmp",
        run_copy / "sub" / ".model.safetensors.1.abcdef12.tmp",  # vaelab's name, not its folder
    ]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    stale = [
        run_copy / ".model.safetensors.4999999.0badc0de.tmp",
        run_copy / "state" / ".train_state.safetensors.4999999.0badc0de.tmp",
    ]
    for path in stale:
        path.write_text("left by a killed run")
    live = run_copy / "eval" / f".val.json.{os.getpid()}.0badc0de.tmp"  # being written now
    live.parent.mkdir(exist_ok=True)
    live.write_text("another process is writing this")
    result = run_cli("train", "--resume", run_copy, "train.epochs=2", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    assert all(p.read_text() == "the user's" for p in mine)
    assert not any(p.exists() for p in stale)
    assert live.read_text() == "another process is writing this"


def test_resume_without_state_is_refused(tmp_path, run_copy):
    shutil.rmtree(run_copy / "state")
    before = snapshot(tmp_path)
    result = run_cli("train", "--resume", run_copy, cwd=tmp_path)
    assert_refused(result, "train_state.safetensors' is missing", "epoch 1")
    assert_unchanged(before, tmp_path)


# -- outputs never replace a run's files or a file vaelab did not write -----------------------
@pytest.mark.parametrize(
    "command",
    [
        ["sample", "{run}", "--out", "{run}/model.safetensors"],
        ["sample", "{run}", "--out", "{run}/config.yaml"],
        ["reconstruct", "{run}", "--out", "{run}/metrics.jsonl"],
        ["encode", "{run}", "--out", "{run}/state/train_state.safetensors"],
        ["traverse", "{run}", "--out", "{run}/eval/val.json"],
        ["report", "{run}", "--out", "{run}/config.json"],
    ],
    ids=["weights", "config", "metrics", "state", "eval", "report-config"],
)
def test_no_output_command_writes_over_a_runs_files(tmp_path, run_copy, command):
    before = snapshot(tmp_path)
    args = [a.format(run=run_copy) for a in command]
    result = run_cli(*args, cwd=tmp_path)
    assert_refused(result, "would write over the run's own")
    assert_unchanged(before, tmp_path)


def test_an_output_that_is_a_folder_is_refused(tmp_path, run_copy):
    before = snapshot(tmp_path)
    for command in (["sample", run_copy], ["encode", run_copy], ["report", run_copy]):
        assert_refused(run_cli(*command, "--out", run_copy, cwd=tmp_path), "is a folder")
    assert_unchanged(before, tmp_path)


def test_outputs_replace_only_what_vaelab_wrote(tmp_path, run_copy):
    user = tmp_path / "picture.png"
    user.write_bytes(b"\x89PNG\r\n\x1a\n the user's own picture")
    before = snapshot(tmp_path)
    assert_refused(
        run_cli("sample", run_copy, "--out", user, cwd=tmp_path), "carries no mark of vaelab"
    )
    assert_refused(
        run_cli("encode", run_copy, "--out", user, cwd=tmp_path), "carries no mark of vaelab"
    )
    assert_unchanged(before, tmp_path)
    # vaelab's own picture may be drawn again; the user's only with --overwrite.
    mine = tmp_path / "samples.png"
    assert run_cli("sample", run_copy, "--out", mine, "-n", "4", cwd=tmp_path).code == 0
    assert run_cli("sample", run_copy, "--out", mine, "-n", "8", cwd=tmp_path).code == 0
    result = run_cli("sample", run_copy, "--out", user, "-n", "4", "--overwrite", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    assert user.read_bytes() != b"\x89PNG\r\n\x1a\n the user's own picture"


@pytest.mark.parametrize(
    "args, words",
    [
        (["sample", "{run}", "--out", "s.png", "-n", "-3"], ["-n", "integer >= 1"]),
        (["sample", "{run}", "--out", "s.png", "--temperature", "nan"], ["--temperature"]),
        (["sample", "{run}", "--out", "s.png", "--temperature", "-1"], ["--temperature"]),
        (["evaluate", "{run}", "--iw-samples", "0"], ["--iw-samples", "integer >= 1"]),
        (["evaluate", "{run}", "--iw-samples", "-5"], ["--iw-samples"]),
        (["traverse", "{run}", "--out", "t.png", "--limit", "inf"], ["--limit"]),
        (["demo", "--epochs", "0"], ["--epochs"]),
    ],
    ids=[
        "n-negative",
        "temperature-nan",
        "temperature-negative",
        "iw-zero",
        "iw-negative",
        "limit-inf",
        "demo-epochs-zero",
    ],
)
def test_bad_command_arguments_are_one_line(tmp_path, run_copy, args, words):
    before = snapshot(tmp_path)
    result = run_cli(*[a.format(run=run_copy) for a in args], cwd=tmp_path)
    message = assert_refused(result, *words)
    assert len(result.lines) == 1, result.stderr
    assert "see `vaelab" in message
    assert_unchanged(before, tmp_path)


# -- sweeps stay inside --out ------------------------------------------------------------------
def test_sweep_values_cannot_escape_the_sweep_folder(tmp_path, digits_csv):
    home = tmp_path / "a" / "b" / "c"
    home.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    before = snapshot(tmp_path)
    result = run_cli(
        "sweep", "--out", "sw", "data.cache_dir=../../../victim,c2",
        f"data.root={digits_csv}", *TINY, cwd=home,
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    assert_unchanged(before, tmp_path, allowed=["a/b/c/sw", "a/b/c/.cache-vaelab", "a/b/c/c2"])
    runs = sorted(p.name for p in (home / "sw").iterdir() if p.is_dir())
    assert len(runs) == 2 and all("/" not in r and r.startswith("data.cache_dir=") for r in runs)
    assert all((home / "sw" / r / "model.safetensors").is_file() for r in runs)


def test_sweep_refuses_a_folder_of_the_users(tmp_path, digits_csv):
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "mine.txt").write_text("x")
    before = snapshot(tmp_path)
    result = run_cli(
        "sweep", "--out", "sw", "model.latent_dim=2,3", f"data.root={digits_csv}", *TINY,
        cwd=tmp_path,
    )  # fmt: skip
    assert_refused(result, "'sw' is not empty")
    assert_unchanged(before, tmp_path)


def test_demo_refuses_a_folder_of_the_users(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "summary.json").write_text("my summary")
    before = snapshot(tmp_path)
    assert_refused(run_cli("demo", "--out", "d", cwd=tmp_path), "'summary.json'")
    assert_unchanged(before, tmp_path)


# -- a run that fails before its first checkpoint leaves nothing behind -----------------------
def test_divergence_before_the_first_checkpoint_leaves_no_folder(tmp_path, digits_csv):
    args = ["train", "--out", "run", f"data.root={digits_csv}", *TINY]
    result = run_cli(*args, "train.lr=1e12", cwd=tmp_path)
    assert_refused(result, "nothing of 'run' was kept", "smaller train.lr")
    assert not (tmp_path / "run").exists()
    assert run_cli(*args, "train.lr=1e-3", cwd=tmp_path).code == 0  # the same command, retried


def test_a_run_killed_before_its_first_checkpoint_restarts_with_new_settings(tmp_path, digits_csv):
    run = tmp_path / "run"
    result = run_cli("train", "--out", run, f"data.root={digits_csv}", *TINY, cwd=tmp_path)
    assert result.code == 0
    for name in ("model.safetensors", "metrics.jsonl"):
        (run / name).unlink()
    shutil.rmtree(run / "state")  # as if killed during epoch 1
    result = run_cli("train", "--resume", run, "train.lr=0.002", "train.seed=3", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    assert (run / "model.safetensors").is_file()


# -- resume notices what changed ---------------------------------------------------------------
def test_resume_refuses_changed_data_unless_accepted(tmp_path, digits_csv):
    data = tmp_path / "digits.csv"
    shutil.copy(digits_csv, data)
    run = tmp_path / "run"
    assert run_cli("train", "--out", run, f"data.root={data}", *TINY, cwd=tmp_path).code == 0
    with open(data, "a") as f:  # 50 more images
        for i in range(50):
            f.write(",".join(["7"] * 784) + f",{i % 10}\n")
    before = snapshot(tmp_path)
    result = run_cli("train", "--resume", run, "train.epochs=2", cwd=tmp_path)
    assert_refused(result, "changed since the run began", "100 train", "--accept-changes")
    assert_unchanged(before, tmp_path)
    result = run_cli("train", "--resume", run, "train.epochs=2", "--accept-changes", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    assert "continuing on changed data" in result.stderr


def test_resume_refuses_hand_edits_of_fixed_keys_unless_accepted(tmp_path, run_copy):
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.001", "lr: 0.5"))
    before = snapshot(tmp_path)
    result = run_cli("train", "--resume", run_copy, "train.epochs=2", cwd=tmp_path)
    assert_refused(result, "was edited since the run began", "train.lr 0.001 -> 0.5")
    assert_unchanged(before, tmp_path)
    result = run_cli(
        "train", "--resume", run_copy, "train.epochs=2", "--accept-changes", cwd=tmp_path
    )
    assert result.code == 0, result.stderr[-2000:]
    assert "edited config.yaml: train.lr 0.001 -> 0.5" in result.stderr
    # What was accepted is remembered: the next resume needs no flag.
    result = run_cli("train", "--resume", run_copy, "train.epochs=3", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]


def test_progress_off_a_terminal_is_one_line_per_epoch(tmp_path, digits_csv):
    args = ["train", "--out", "run", f"data.root={digits_csv}", *TINY, "train.epochs=2"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.code == 0
    assert "\r" not in result.stderr + result.stdout  # no bar frames in a log
    epochs = [line for line in result.stdout.splitlines() if " epoch " in line]
    assert [line.split(":")[0] for line in epochs] == ["vae epoch 1/2", "vae epoch 2/2"]


# -- locks -------------------------------------------------------------------------------------
def _long_run(cwd: Path, csv: Path, out: str = "run", epochs: int = 400) -> subprocess.Popen:
    env = {**os.environ, "VAELAB_CACHE": str(cwd / ".cache-vaelab")}
    return subprocess.Popen(
        [sys.executable, "-m", "vaelab", "train", "--out", out, f"data.root={csv}", *TINY,
         f"train.epochs={epochs}"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.01)


def test_two_trainings_into_one_folder_cannot_both_run(tmp_path, digits_csv):
    first = _long_run(tmp_path, digits_csv)
    try:
        _wait_for(tmp_path / "run" / "config.yaml", first)
        result = run_cli("train", "--out", "run", f"data.root={digits_csv}", *TINY, cwd=tmp_path)
        assert_refused(result, "already holds a run")
        result = run_cli("train", "--resume", "run", cwd=tmp_path)
        assert_refused(result, "'run' is in use by process", str(first.pid))
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the killed process's lock: the run resumes at once.
    result = run_cli("train", "--resume", "run", "train.epochs=1", cwd=tmp_path)
    assert "in use by" not in result.stderr and "Traceback" not in result.stderr
    assert result.code == 0 or "has finished" in result.stderr, result.stderr[-2000:]


def test_two_trainings_started_together_one_wins(tmp_path, digits_csv):
    procs = [_long_run(tmp_path, digits_csv, epochs=2) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2], errors
    loser = errors[codes.index(2)]
    assert "Traceback" not in loser
    assert "in use by" in loser or "already holds a run" in loser or "is not empty" in loser


# -- exact resume after SIGKILL, SIGINT, SIGTERM and a full disk -------------------------------
EPOCHS = 12


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_csv) -> dict[str, np.ndarray]:
    home = tmp_path_factory.mktemp("whole")
    result = run_cli(
        "train", "--out", "run", f"data.root={digits_csv}", *TINY, f"train.epochs={EPOCHS}",
        "train.lr_schedule=cosine", "train.batch_size=4", cwd=home,
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    return weights(home / "run")


def _sigint_as_a_terminal_would() -> None:
    """In the child before exec: SIGINT's default action. A shell without job control starts
    background commands with SIGINT ignored, and Python then leaves it ignored: the suite run
    with `make test &` would see a run that SIGINT cannot stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(tmp_path: Path, csv: Path, how: str) -> subprocess.Popen:
    """Start a training, stop it after its first checkpoint the way ``how`` says, return it."""
    env = {**os.environ, "VAELAB_CACHE": str(tmp_path / ".cache-vaelab")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaelab", "train", "--out", "run", f"data.root={csv}", *TINY,
         f"train.epochs={EPOCHS}", "train.lr_schedule=cosine", "train.batch_size=4"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_a_terminal_would,
    )  # fmt: skip
    _wait_for(tmp_path / "run" / "state" / "train_state.safetensors", proc)
    if how == "disk full":
        # From now on no file of this process may grow past 1 byte: the next checkpoint fails.
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
    else:
        os.kill(proc.pid, {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT,
                           "SIGTERM": signal.SIGTERM}[how])  # fmt: skip
    proc.wait(timeout=300)
    return proc


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM", "disk full"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, digits_csv, uninterrupted, how):
    # batch 4: 25 steps an epoch, so the run is still going when it is stopped
    proc = _interrupt(tmp_path, digits_csv, how)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode != 0, "the run finished before it was interrupted"
    assert "Traceback" not in err, err[-3000:]
    if how == "disk full":
        assert proc.returncode == 2
        assert "cannot write" in err and "the last checkpoint in 'run' (epoch" in err, err
    if how == "SIGINT":
        assert proc.returncode == 130 and "continue: --resume RUN" in err
    result = run_cli("train", "--resume", "run", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    whole = uninterrupted
    resumed = weights(tmp_path / "run")
    assert resumed.keys() == whole.keys()
    for key, value in whole.items():
        assert np.array_equal(value, resumed[key]), key


def test_a_lock_file_that_is_a_link_is_never_followed(tmp_path, digits_csv):
    (tmp_path / "precious.txt").write_text("my thesis")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".vaelab.lock").symlink_to("../precious.txt")
    before = snapshot(tmp_path)
    result = run_cli("train", "--out", "run", f"data.root={digits_csv}", *TINY, cwd=tmp_path)
    assert_refused(result, "'run' is not empty")
    assert_unchanged(before, tmp_path)


def test_outputs_never_replace_the_files_of_sweeps_and_locks(tmp_path, run_copy):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    (sweep / ".vaelab.lock").write_text("")
    before = snapshot(tmp_path)
    for out in (sweep / "sweep.json", run_copy / ".vaelab.lock", tmp_path / ".vaelab.lock"):
        result = run_cli("sample", run_copy, "--out", out, "--overwrite", cwd=tmp_path)
        assert_refused(result, "would write over")
    assert_unchanged(before, tmp_path)


def test_a_run_of_an_older_vaelab_with_a_now_refused_setting_still_loads(tmp_path, run_copy):
    # Made before sigma2 with a Bernoulli likelihood was refused: it must keep working.
    for name in ("config.json", "config.yaml"):
        path = run_copy / name
        text = path.read_text()
        text = text.replace('"likelihood": "gaussian"', '"likelihood": "bernoulli"')
        text = text.replace('"sigma2": 0.5', '"sigma2": 1.0')
        text = text.replace("likelihood: gaussian", "likelihood: bernoulli")
        text = text.replace("sigma2: 0.5", "sigma2: 1.0")
        path.write_text(text)
    result = run_cli("sample", run_copy, "--out", "s.png", "-n", "4", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    result = run_cli("evaluate", run_copy, "--iw-samples", "2", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
