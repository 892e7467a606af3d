import functools
import importlib
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch.amp import GradScaler

import vaelab
from tests.conftest import tiny_config
from vaelab import machine
from vaelab.checkpoint import CheckpointError, weights_metadata
from vaelab.config import ConfigError
from vaelab.models.vae import VAE
from vaelab.rundir import RunDirError
from vaelab.trainer import TrainingDiverged, learning_rate, read_metrics

KEYS = ["split", "epoch", "step", "loss", "recon", "kl", "elbo_nats", "bpd", "seconds"]


def weights(run):
    return vaelab.load(run).state_dict()


def test_metrics_and_files(tmp_path, splits):
    run = vaelab.train(tiny_config(), tmp_path / "run", splits=splits)
    rows = read_metrics(run)
    assert [(r["split"], r["epoch"]) for r in rows] == [
        ("train", 1),
        ("val", 1),
        ("train", 2),
        ("val", 2),
    ]
    for r in rows:
        assert list(r) == KEYS
    assert rows[-1]["step"] == 2 * (64 // 16)
    last = rows[-1]
    k = 64
    assert last["bpd"] == pytest.approx((-last["elbo_nats"] / k + math.log(255)) / math.log(2))
    # Gaussian, sigma2 = 1/2: -elbo = recon + K/2 log(pi) + kl, per image, averaged.
    expected = -(last["recon"] + 0.5 * k * math.log(math.pi) + last["kl"])
    assert last["elbo_nats"] == pytest.approx(expected, rel=1e-6)
    for name in [
        "config.yaml",
        "config.json",
        "model.safetensors",
        "state/train_state.safetensors",
    ]:
        assert (run / name).is_file()
    assert not list(run.rglob("*.tmp"))
    assert vaelab.load_config(run / "config.yaml") == tiny_config()


def test_training_is_deterministic(tmp_path, splits):
    a = vaelab.train(tiny_config(), tmp_path / "a", splits=splits)
    b = vaelab.train(tiny_config(), tmp_path / "b", splits=splits)
    for k, v in weights(a).items():
        assert torch.equal(v, weights(b)[k]), k


class Interrupt(Exception):
    pass


def stop_after(epoch):
    def callback(e, rows):
        if e == epoch:
            raise Interrupt

    return callback


@pytest.mark.parametrize(
    ("name", "schedule"), [("vae", "constant"), ("beta_vae", "cosine"), ("decoder_only", "cosine")]
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, splits, name, schedule):
    cfg = tiny_config(f"model.name={name}", "train.epochs=3", f"train.lr_schedule={schedule}")
    full = vaelab.train(cfg, tmp_path / "full", splits=splits)
    with pytest.raises(Interrupt):
        vaelab.train(cfg, tmp_path / "cut", splits=splits, on_epoch_end=stop_after(1))
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1, 1]
    vaelab.resume(tmp_path / "cut", splits=splits)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(tmp_path / "cut")[k]), k
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_metrics(full)) == drop(read_metrics(tmp_path / "cut"))


def test_resume_can_extend_but_not_change_the_run(tmp_path, splits):
    run = vaelab.train(tiny_config("train.epochs=1"), tmp_path / "run", splits=splits)
    vaelab.resume(run, ["train.epochs=2"], splits=splits)
    assert read_metrics(run)[-1]["epoch"] == 2
    with pytest.raises(ConfigError, match="'model.beta' cannot change when resuming"):
        vaelab.resume(run, ["model.beta=3"], splits=splits)
    with pytest.raises(RunDirError, match="already holds a run"):
        vaelab.train(tiny_config(), run, splits=splits)
    with pytest.raises(CheckpointError, match="is '.*' a vaelab run"):
        vaelab.resume(tmp_path / "nothing", splits=splits)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, splits, monkeypatch):
    cfg = tiny_config("train.epochs=3", "train.log_every=1")  # the loss read at every step
    run = tmp_path / "run"
    original = VAE.forward
    calls = {"n": 0}

    def forward(self, x, ctx=None):
        out = original(self, x, ctx)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:  # epoch 2, step 6 (4 steps per epoch)
                return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})
        return out

    monkeypatch.setattr(VAE, "forward", forward)
    with pytest.raises(
        TrainingDiverged, match=r"at epoch 2, step 6; the last good checkpoint \(epoch 1\)"
    ):
        vaelab.train(cfg, run, splits=splits)
    assert weights_metadata(run)["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in weights(run).values() if v.is_floating_point())
    assert [r["epoch"] for r in read_metrics(run)] == [1, 1]


def test_nan_weights_after_a_finite_loss_are_never_saved(tmp_path, splits, monkeypatch):
    original = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # the last step of epoch 2: its loss was finite
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="weights became non-finite in epoch 2 .by step 8."):
        vaelab.train(tiny_config("train.epochs=3"), run, splits=splits)
    assert weights_metadata(run)["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in weights(run).values() if v.is_floating_point())


def test_crash_between_metrics_and_state_resumes_exactly(tmp_path, splits, monkeypatch):
    cfg = tiny_config("train.epochs=3")
    full = vaelab.train(cfg, tmp_path / "full", splits=splits)
    trainer = importlib.import_module("vaelab.trainer")
    real = trainer.save_train_state
    calls = {"n": 0}

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # metrics of epoch 2 are written, its state is not
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_train_state", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        vaelab.train(cfg, tmp_path / "cut", splits=splits)
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1, 1, 2, 2]
    monkeypatch.setattr(trainer, "save_train_state", real)
    vaelab.resume(tmp_path / "cut", splits=splits)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(tmp_path / "cut")[k]), k
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [1, 1, 2, 2, 3, 3]


def test_bad_input_fails_before_a_run_directory_exists(tmp_path, splits):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device"):
            vaelab.train(tiny_config("train.device=cuda"), tmp_path / "a", splits=splits)
        assert not (tmp_path / "a").exists()
    with pytest.raises(vaelab.data.DataError, match="does not exist"):
        vaelab.train(tiny_config("data.name=folder", f"data.root={tmp_path}/none"), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_resume_refuses_fewer_epochs_than_finished(tmp_path, splits):
    run = vaelab.train(tiny_config("train.epochs=2"), tmp_path / "run", splits=splits)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="has finished 2 epochs, expected at least that many"):
        vaelab.resume(run, ["train.epochs=1"], splits=splits)
    assert (run / "config.yaml").read_text() == before


def test_binarized_data_for_bernoulli(tmp_path, splits):
    cfg = tiny_config("data.binarize=true", "model.likelihood=bernoulli")
    run = vaelab.train(cfg, tmp_path / "run", splits=splits)
    row = read_metrics(run)[-1]
    assert row["bpd"] == pytest.approx(-row["elbo_nats"] / (64 * math.log(2)))
    x = vaelab.data.build(vaelab.load_config(overrides=["data.binarize=true"]).data).val.batch(
        slice(0, 10)
    )
    assert set(x.unique().tolist()) == {0.0, 1.0}


def test_cosine_schedule_decays_from_lr_to_zero():
    tc = tiny_config("train.lr=0.01", "train.lr_schedule=cosine").train
    assert learning_rate(tc, 0, 100) == pytest.approx(0.01)
    assert learning_rate(tc, 50, 100) == pytest.approx(0.005)
    assert learning_rate(tc, 100, 100) == pytest.approx(0.0)
    assert learning_rate(tiny_config("train.lr=0.01").train, 70, 100) == 0.01


def _collapse_run(tmp_path, name):
    cfg = vaelab.load_config(
        overrides=[
            f"model.name={name}",
            "model.widths=[16,32]",
            "model.latent_dim=8",
            "train.epochs=4",
            "train.progress=false",
        ]
    )
    return vaelab.train(cfg, tmp_path / name)


@pytest.mark.slow
def test_decoder_only_collapses_and_vae_does_not(tmp_path):
    from vaelab import data
    from vaelab.evaluate import diversity_ratio

    val = data.build(vaelab.load_config().data).val
    collapsed = diversity_ratio(vaelab.load(_collapse_run(tmp_path, "decoder_only")), val)
    learned = diversity_ratio(vaelab.load(_collapse_run(tmp_path, "vae")), val)
    assert collapsed < 0.1, collapsed
    assert learned > 0.4, learned


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_tensorboard_logs_scalars_and_images(tmp_path, splits, precision):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(
        "train.tensorboard=true", f"train.precision={precision}", "model.name=sigma_vae"
    )
    run = vaelab.train(cfg, tmp_path / "run", splits=splits)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"loss/train", "loss/val", "kl/val", "elbo_nats/val"} <= set(events.Tags()["scalars"])
    assert {"sigma2/train", "sigma2/val"} <= set(events.Tags()["scalars"])  # a variant's term
    assert [e.step for e in events.Scalars("loss/val")] == [4, 8]
    assert "samples" in events.Tags()["images"]


def test_tensorboard_missing_is_a_clear_error_before_anything_is_written(
    tmp_path, splits, monkeypatch
):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install 'vaelab\[tensorboard\]'"):
        vaelab.train(tiny_config("train.tensorboard=true"), tmp_path / "run", splits=splits)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bf16_fp16_and_channels_last_reach_the_fp32_validation_elbo(tmp_path):
    common = ["model.widths=[16,32]", "train.epochs=2", "train.progress=false",
              "train.allow_emulated=true"]  # fmt: skip
    rows = {}
    for name, extra in [
        ("fp32", ["train.channels_last=false"]),
        ("bf16", ["train.precision=bf16", "train.channels_last=false"]),
        ("bf16_cl", ["train.precision=bf16", "train.channels_last=true"]),
        ("fp16", ["train.precision=fp16"]),  # with its gradient scaler
    ]:
        run = vaelab.train(vaelab.load_config(overrides=[*common, *extra]), tmp_path / name)
        rows[name] = read_metrics(run)[-1]
    for name in ["bf16", "bf16_cl", "fp16"]:
        assert rows[name]["elbo_nats"] == pytest.approx(rows["fp32"]["elbo_nats"], rel=0.01)
        assert rows[name]["recon"] == pytest.approx(rows["fp32"]["recon"], rel=0.1), name
    assert rows["bf16"]["recon"] != rows["fp32"]["recon"]  # bf16 really ran in bf16
    assert rows["fp16"]["recon"] != rows["fp32"]["recon"]


def test_auto_precision_recorded_and_emulated_refused_on_resume(tmp_path, splits, monkeypatch,
                                                                 caplog):  # fmt: skip
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(machine, "cpu_flags", lambda *a: frozenset({"avx2", "avx512_bf16"}))
    caplog.set_level("INFO", logger="vaelab")
    run = vaelab.train(tiny_config("train.precision=auto", "train.epochs=1"), tmp_path / "run",
                       splits=splits)  # fmt: skip
    assert "train.precision=auto picked bf16: the CPU computes bf16 natively" in caplog.text
    text = (run / "config.yaml").read_text()
    assert "  precision: bf16  # auto picked it: the CPU computes bf16 natively" in text
    assert vaelab.load_config(run / "config.yaml").train.precision == "bf16"
    recorded = json.loads((run / "config.json").read_text())["train"]
    assert recorded["precision"] == "bf16"
    # The same run on a CPU that emulates bf16: refused in one line, nothing changed; auto
    # continues it in fp32 and config.yaml says so.
    monkeypatch.setattr(machine, "cpu_flags", lambda *a: frozenset({"avx2"}))
    with pytest.raises(ConfigError, match=r"^config key 'train.precision': bf16 would be"):
        vaelab.resume(run, ["train.epochs=2"], splits=splits)
    assert (run / "config.yaml").read_text() == text
    vaelab.resume(run, ["train.epochs=2", "train.precision=auto"], splits=splits)
    assert (
        "  precision: fp32  # auto picked it: the CPU has no avx512_bf16"
        in (run / "config.yaml").read_text()
    )
    assert [r["epoch"] for r in read_metrics(run) if r["split"] == "val"] == [1, 2]
    # An explicit bf16 here fails before anything is written.
    with pytest.raises(ConfigError, match="train.allow_emulated=true"):
        vaelab.train(tiny_config("train.precision=bf16"), tmp_path / "new", splits=splits)
    assert not (tmp_path / "new").exists()


def test_fp16_run_resumes_exactly_with_its_gradient_scaler(tmp_path, splits, monkeypatch):
    # A start scale at which fp16 gradients overflow here: the scaler skips the first steps and
    # halves its scale, so a resume that forgot the scale would skip steps again.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(GradScaler, init_scale=2.0**17))
    fp16 = ["train.precision=fp16", "train.allow_emulated=true"]
    whole = vaelab.train(tiny_config(*fp16, "train.epochs=2"), tmp_path / "whole", splits=splits)
    part = vaelab.train(tiny_config(*fp16, "train.epochs=1"), tmp_path / "part", splits=splits)
    with safe_open(str(part / "state" / "train_state.safetensors"), "pt") as f:
        scaler = json.loads(f.metadata()["counters"])["grad_scaler"]
    assert scaler["scale"] < 2.0**17 and scaler["_growth_tracker"] > 0  # backed off, then stepped
    vaelab.resume(part, ["train.epochs=2"], splits=splits)
    a, b = weights(whole), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_keeps_the_loss_terms_in_fp32(splits):
    model = vaelab.models.build(tiny_config().model, (1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(splits.train.batch(slice(0, 4)))
    assert {t.dtype for t in (out.loss, out.elbo, *out.terms.values())} == {torch.float32}
    with pytest.raises(ConfigError, match="train.precision"):
        tiny_config("train.precision=fp8")


def test_a_failing_compile_falls_back_to_eager_with_the_same_weights(tmp_path, splits, monkeypatch,
                                                                      capsys):  # fmt: skip
    eager = vaelab.train(tiny_config("train.epochs=1"), tmp_path / "eager", splits=splits)

    def broken(fn, **kwargs):
        def compiled(x, ctx=None):
            fn.encoder(x)  # part of a forward: batch-norm statistics move, noise is drawn
            torch.randn(3)
            raise RuntimeError("no C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    run = vaelab.train(
        tiny_config("train.epochs=1", "train.compile=true"), tmp_path / "c", splits=splits
    )
    assert "train.compile: torch.compile failed (RuntimeError: no C++ compiler found)" in (
        capsys.readouterr().out
    )
    a, b = weights(eager), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_really_compiles_and_trains_as_eager(tmp_path, splits, monkeypatch, capsys,
                                                     caplog):  # fmt: skip
    """train.compile=true goes through a real torch.compile (dynamo; a backend that runs the
    captured graphs as they are, so no C++ compiler is needed) without falling back."""
    eager = vaelab.train(tiny_config("train.epochs=1"), tmp_path / "eager", splits=splits)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, dynamic=False)
    )
    run = vaelab.train(
        tiny_config("train.epochs=1", "train.compile=true"), tmp_path / "c", splits=splits
    )
    assert "torch.compile failed" not in capsys.readouterr().out
    assert graphs  # dynamo captured the forward
    assert "train.compile on a CPU: compiling takes about a minute" in caplog.text
    a, b = weights(eager), weights(run)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Python's report
def test_ctrl_c_stops_training_even_when_it_lands_in_a_finalizer(tmp_path, splits):
    """A KeyboardInterrupt raised inside a __del__ is printed and ignored by Python; the
    trainer still stops at the next step, keeping the last finished epoch."""

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs here, and its exception is ignored
                pass

    def on_epoch_end(epoch, rows):
        if epoch == 1:
            Finalized()  # dropped at once: __del__ runs

    # Python's default handler, as in a terminal (a suite started in the background by a shell
    # without job control inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            vaelab.train(tiny_config("train.epochs=3"), tmp_path / "run", splits=splits,
                         on_epoch_end=on_epoch_end)  # fmt: skip
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert [r["epoch"] for r in read_metrics(tmp_path / "run") if r["split"] == "val"] == [1]


CACHE_PROBE = """
import resource, sys, torch
from vaelab.speed import cache_cpu_memory

def faults_per_cycle():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        t = torch.empty(48 * 2**20 // 4)  # 48 MiB: above glibc's largest mmap threshold
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_per_cycle()
default = faults_per_cycle()
took = cache_cpu_memory()
# Python's own small objects can land in freed space and make one allocation grow the heap
# again: the least faults of a few cycles is the steady state a training loop reaches.
print(default, int(took), min(faults_per_cycle() for _ in range(4)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_cpu_memory_cache_stops_page_faults_on_large_tensors():
    # A fresh process: the setting is process-wide and stays.
    out = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    default, took, cached = map(int, out)
    pages = 3 * 48 * 2**20 // resource.getpagesize()
    assert default > pages // 2  # glibc unmaps a freed 48 MiB block: every page faults again
    assert took == 1
    assert cached < pages // 20, (default, cached)


def test_fast_layers_train_the_same_weights_as_torchs_layers(tmp_path, splits, monkeypatch):
    calls = []
    for function in (
        vaelab.nets.fast._ConvTransposeSummedBias,
        vaelab.nets.fast._ConvFewOutputsBackward,
    ):

        def counted(ctx, grad, backward=function.backward, name=function.__name__):
            calls.append(name)
            return backward(ctx, grad)

        monkeypatch.setattr(function, "backward", counted)
    runs, used = {}, {}
    for fast in (True, False):
        calls.clear()
        cfg = tiny_config("train.precision=fp64", f"train.fast_layers={str(fast).lower()}")
        runs[fast] = weights(vaelab.train(cfg, tmp_path / str(fast), splits=splits))
        used[fast] = set(calls)
    assert used[False] == set()
    assert used[True] == {"_ConvTransposeSummedBias", "_ConvFewOutputsBackward"}
    for k, v in runs[True].items():
        torch.testing.assert_close(v, runs[False][k], rtol=0, atol=1e-9, msg=k)


def test_a_failed_first_checkpoint_keeps_nothing_and_can_be_rerun(tmp_path, splits, monkeypatch):
    trainer = importlib.import_module("vaelab.trainer")

    def full_disk(run, *args, **kwargs):
        raise RunDirError(f"cannot write '{run}/state/train_state.safetensors': No space left")

    monkeypatch.setattr(trainer, "save_train_state", full_disk)
    with pytest.raises(RunDirError, match="no epoch had been saved, so nothing of it was kept"):
        vaelab.train(tiny_config(), tmp_path / "a" / "run", splits=splits)
    assert not (tmp_path / "a").exists()  # the folders it made are gone too
    monkeypatch.undo()
    vaelab.train(tiny_config(), tmp_path / "a" / "run", splits=splits)
