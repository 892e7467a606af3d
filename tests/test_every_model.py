"""Issue 17's acceptance, for every model vaelab registers: it trains, resumes bit-identically
after ``kill -9``, loads without unpickling, evaluates (importance sampling and AIS where the
latent is continuous; a model with a discrete latent, vq_vae, has them skipped with the reason
recorded, and ``vaelab gap`` and ``--bdmc`` refuse it) and appears in the report.

The list comes from the registry at collection time, so a model added to ``vaelab.models`` is
covered without touching this file. Models a test file registers are left out: a fresh
``python -m vaelab`` process (the killed run's) never imports them.

Per model, one module-scoped fixture (``runs``) trains on 96 random 8x8 digits, 4 steps an
epoch, two epochs:

- "killed": ``vaelab train --out killed ...`` in a new process (the command line's ``main``)
  with a hook that, after the first step of epoch 2 (the epoch-1 checkpoint on disk, one
  optimizer step past it only in memory), writes a marker and sleeps; the fixture then sends
  SIGKILL and resumes the run here. The hook makes the kill land inside epoch 2 however loaded
  the machine is; a kill racing the training loop would sometimes come after the run had
  finished, and check nothing.
- "straight": the same config trained here, in one go, while the other process starts.

The straight run and the resume are the library calls the command line makes, in this
process: each ``python -m vaelab train`` costs about 6 s on an idle core before its first step
(importing torch, and torch._dynamo, which ``torch.optim.Adam`` imports), so three processes a
model would take minutes for the registry; one a model, the one that is killed, is the point.
"""

from __future__ import annotations

import contextlib
import html
import io
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vaelab
from vaelab import rundir
from vaelab.checkpoint import read_metrics, weights_metadata
from vaelab.config import ConfigError
from vaelab.evaluate import evaluate, gap_decomposition
from vaelab.metrics import is_number
from vaelab.models import MODELS
from vaelab.models.base import RESERVED
from vaelab.report.figures import panels
from vaelab.report.html import EVAL_KEYS, write_report

# The models a fresh `python -m vaelab` knows: those registered by vaelab's own modules.
NAMES = sorted(name for name, cls in MODELS.items() if cls.__module__.startswith("vaelab."))
# Settings a model needs beyond TINY to train in a few steps (iwae keeps its K = 5; vq_vae reads
# TINY's latent of 2 as L = 2 codes of one number, from a codebook of 16).
SETTINGS: dict[str, list[str]] = {"vq_vae": ["model.code_dim=1", "model.codebook_size=16"]}
EPOCHS = 2
TINY = [
    "data.size=8",
    "data.val_fraction=0.25",  # 76 train images (4 steps of 16), 20 val (by class)
    "model.widths=[4,8]",
    "model.latent_dim=2",
    "train.batch_size=16",
    f"train.epochs={EPOCHS}",
    "train.progress=false",
    "train.threads=1",  # one core each: the two trainings run side by side
]
IW_SAMPLES, AIS_STEPS, AIS_CHAINS = 8, 5, 2
TIMEOUT = 600  # seconds a process may take on a loaded machine
# Run in place of `python -m vaelab`: the CLI, with a pause after the first step of epoch 2.
STOP_IN_EPOCH_2 = """
import os, sys, time
from pathlib import Path
from vaelab import trainer
from vaelab.cli import main

train_step, parent = trainer.train_step, os.getppid()

def step_then_stop_in_epoch_2(session, x, ctx, total_steps):
    out = train_step(session, x, ctx, total_steps)
    if ctx.epoch == 2:
        # Written whole, then renamed: the test waits for the name, then reads the step.
        marker = Path(os.environ["VAELAB_TEST_STOPPED"])
        Path(f"{marker}.part").write_text(str(ctx.step))
        os.replace(f"{marker}.part", marker)
        while os.getppid() == parent:  # until SIGKILL, or the test process is gone
            time.sleep(0.05)
        os._exit(1)
    return out

trainer.train_step = step_then_stop_in_epoch_2
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Runs:
    name: str
    straight: Path
    killed: Path  # killed in epoch 2, then resumed
    at_kill: dict[str, Any]  # what the killed run held when it was killed


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 random digits in mnist5k's CSV format (784 pixel columns, then the label)."""
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (96, 784)), np.arange(96)[:, None] % 10], axis=1)
    path = tmp_path_factory.mktemp("digits") / "digits.csv"
    np.savetxt(path, rows, fmt="%d", delimiter=",")
    return path


def _train_until_epoch_2(run: Path, overrides: list[str], stopped: Path) -> subprocess.Popen:
    """``vaelab train --out RUN OVERRIDES`` in a new process that stops (``STOP_IN_EPOCH_2``)
    one step into epoch 2; its output goes to RUN.log."""
    env = {**os.environ, "VAELAB_CACHE": str(run.parent / ".cache-vaelab"),
           "VAELAB_TEST_STOPPED": str(stopped)}  # fmt: skip
    with open(f"{run}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", STOP_IN_EPOCH_2, "train", "--out", str(run), *overrides],
            cwd=run.parent, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before epoch 2:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"{path.name} did not appear within {TIMEOUT} s:\n{log.read_text()}")
        time.sleep(0.02)


@pytest.fixture(scope="module", params=NAMES)
def runs(request: pytest.FixtureRequest, tmp_path_factory, digits) -> Runs:
    name = request.param
    home = tmp_path_factory.mktemp(name)
    overrides = [f"data.root={digits}", *TINY, f"model.name={name}", *SETTINGS.get(name, [])]
    killed, stopped = home / "killed", home / "stopped"
    proc = _train_until_epoch_2(killed, overrides, stopped)
    try:
        # While that process starts (seconds of imports), the same run straight through, here:
        # what `vaelab train --out straight OVERRIDES` calls.
        straight = vaelab.train(vaelab.load_config(overrides=overrides), home / "straight")
        _wait_for(stopped, proc, Path(f"{killed}.log"))
        os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:  # a failure above: stop the process this fixture started
            proc.kill()
            proc.wait()
    at_kill = {
        "returncode": code,
        "step": int(stopped.read_text()),
        "epoch": weights_metadata(killed).get("epoch"),
        "rows": [r["epoch"] for r in read_metrics(killed)],
        "state": (killed / rundir.STATE).is_file(),
    }
    vaelab.resume(killed)  # what `vaelab train --resume killed` calls
    return Runs(name, straight, killed, at_kill)


def _without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _terms(run: Path) -> list[str]:
    """The model's own terms, as its metrics.jsonl names them (recon, kl, tc, sigma2, ...)."""
    row = read_metrics(run)[-1]
    return [k for k, v in row.items() if k not in RESERVED and is_number(v)]


# -- trains -------------------------------------------------------------------------------------
def test_trains(runs):
    rows = read_metrics(runs.straight)
    assert [(r["split"], r["epoch"]) for r in rows] == [
        (split, epoch) for epoch in range(1, EPOCHS + 1) for split in ("train", "val")
    ]
    assert weights_metadata(runs.straight)["epoch"] == EPOCHS
    assert rows[-1]["step"] == 4 * EPOCHS  # 76 train images, full batches of 16
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["elbo_nats"]) for r in rows)
    weights = load_file(runs.straight / rundir.WEIGHTS)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


# -- resumes bit-identically after kill -9 ------------------------------------------------------
def test_resumes_bit_identically_after_kill_9(runs):
    at_kill = runs.at_kill
    assert at_kill["returncode"] == -signal.SIGKILL
    # Killed inside epoch 2: the epoch-1 checkpoint whole, one step of epoch 2 only in memory.
    assert at_kill["step"] == 4 and at_kill["epoch"] == 1 and at_kill["state"], at_kill
    assert at_kill["rows"] == [1, 1], at_kill
    straight = load_file(runs.straight / rundir.WEIGHTS)
    resumed = load_file(runs.killed / rundir.WEIGHTS)
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert resumed[key].dtype == value.dtype and torch.equal(resumed[key], value), key
    assert weights_metadata(runs.killed) == weights_metadata(runs.straight)
    assert _without_seconds(read_metrics(runs.killed)) == _without_seconds(
        read_metrics(runs.straight)
    )


# -- loads without unpickling, evaluates ---------------------------------------------------------
@contextlib.contextmanager
def no_unpickling() -> Iterator[list[str]]:
    """Every way vaelab could unpickle raises inside the block, and is recorded (in case a
    caller swallowed the error); the block must end with the record empty."""
    calls: list[str] = []

    def refuse(what: str):
        def refused(*args: object, **kwargs: object) -> None:
            calls.append(what)
            raise AssertionError(f"{what} was called: a checkpoint must load without pickle")

        return refused

    class RefusedUnpickler(pickle.Unpickler):  # a class still: modules imported now subclass it
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse("pickle.Unpickler")()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickle, "Unpickler", RefusedUnpickler)
        for module, attr in [(pickle, "load"), (pickle, "loads"), (torch, "load"),
                             (torch.serialization, "load")]:  # fmt: skip
            mp.setattr(module, attr, refuse(f"{module.__name__}.{attr}"))
        yield calls
    assert not calls, calls


def test_the_guard_catches_unpickling(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(AssertionError, match="was called"), no_unpickling():
        torch.load(tmp_path / "w.pt", weights_only=True)
    with pytest.raises(AssertionError, match="was called"), no_unpickling():
        pickle.loads(pickle.dumps(1))
    with pytest.raises(AssertionError, match="was called"), no_unpickling():
        pickle.Unpickler(io.BytesIO(pickle.dumps(1))).load()


@pytest.fixture(scope="module")
def evaluated(runs) -> dict[str, Any]:
    """The resumed run loaded and evaluated (K importance samples, AIS), nothing unpickled."""
    with no_unpickling():
        model = vaelab.load(runs.killed)
        result = evaluate(
            runs.killed, "val", iw_samples=IW_SAMPLES, progress=False,
            ais_steps=AIS_STEPS, ais_chains=AIS_CHAINS,
        )  # fmt: skip
    return {"model": model, "result": result}


def test_loads_without_unpickling(runs, evaluated):
    model = evaluated["model"]
    assert type(model) is MODELS[runs.name]
    saved = load_file(runs.killed / rundir.WEIGHTS)
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if is_number(value) else []


def test_evaluates_with_importance_sampling_and_ais(runs, evaluated):
    result = evaluated["result"]
    assert all(math.isfinite(n) for n in _numbers(result)), result
    if not MODELS[runs.name].continuous_latent:
        _check_skipped_for_a_discrete_latent(runs, result)
        return
    assert result["num_images"] == 20 and result["iw_samples"] == IW_SAMPLES
    assert (result["ais_steps"], result["ais_chains"]) == (AIS_STEPS, AIS_CHAINS)
    assert 0 <= result["ais_accept_rate"] <= 1
    # log p(x) >= ELBO; K = 8 importance samples estimate log p(x) with a downward bias, so the
    # estimate may fall a little below the ELBO on 20 images: 1 nat of slack.
    assert result["iw_nll_nats"] <= -result["elbo_nats"] + 1, result
    assert result["ais_nll_nats"] <= -result["elbo_nats"] + 1, result
    # Two estimators of one log p(x) (from the model's own prior, learned or not) agree.
    assert abs(result["iw_nll_nats"] - result["ais_nll_nats"]) < 1, result
    # The model validation scored: the last val row, term by term (1e-6 nats absolute for a term
    # near 0, such as a Monte Carlo KL, a difference of two numbers of order 1 in float32).
    last = read_metrics(runs.killed)[-1]
    assert last["split"] == "val"
    for key in ["loss", "elbo_nats", *_terms(runs.killed)]:
        assert result[key] == pytest.approx(last[key], rel=1e-6, abs=1e-6), key


def _check_skipped_for_a_discrete_latent(runs: Runs, result: dict[str, Any]) -> None:
    """No IS or AIS number, and the reason in their place; the estimators that need a density
    refuse the run in one line naming it; the ELBO and every term were evaluated."""
    assert "discrete latent" in result["likelihood_skipped"], result
    for key in ("iw_nll_nats", "iw_bpd", "elbo_gap_nats", "ais_nll_nats", "iw_samples",
                "ais_steps"):  # fmt: skip
        assert key not in result, key
    assert result["num_images"] == 20 and math.isfinite(result["elbo_nats"])
    last = read_metrics(runs.killed)[-1]
    for key in ["loss", "elbo_nats", *_terms(runs.killed)]:
        assert result[key] == pytest.approx(last[key], rel=1e-6, abs=1e-6), key
    for call in (lambda: gap_decomposition(runs.killed, "val", progress=False),
                 lambda: evaluate(runs.killed, "val", progress=False, bdmc=2)):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and str(runs.killed) in message and "discrete" in message
    assert not (runs.killed / rundir.EVAL / "gap_val.json").exists()


# -- appears in the report ----------------------------------------------------------------------
def test_appears_in_the_report(runs, evaluated, tmp_path):
    with no_unpickling():
        page = write_report([runs.killed], tmp_path / "report.html").read_text()
    assert f"<td>model.name</td><td>{runs.name}</td>" in page
    labels = dict(EVAL_KEYS)
    terms = _terms(runs.killed)
    assert terms, "a model names at least one term"
    for term in terms:  # each in the evaluation table, under its label or its own name
        label = labels.get(term, f"{term} (a term of the model)")
        assert f"<td>{html.escape(label)}</td>" in page, term
    if MODELS[runs.name].continuous_latent:
        iw = evaluated["result"]["iw_nll_nats"]
        assert f"<td>{html.escape(labels['iw_nll_nats'])}</td><td>{iw:.4g}</td>" in page
    else:  # no IS number, and the reason shown instead
        why = html.escape(evaluated["result"]["likelihood_skipped"])
        assert f"<td>importance sampling and AIS not run, because</td><td>{why}</td>" in page
    # and each in the loss curves, a panel of its own
    assert set(terms) <= {key for key, _ in panels(read_metrics(runs.killed))}
    assert page.count("<img") >= 5  # curves, reconstructions, samples, interpolations, traversals
