"""Hostile input, in process: the library functions behind the command line refuse bad input
with one line naming the key, file or option, before any work, and never replace a file that
is not theirs. (tests/hostile/ runs the command line itself.)"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vaelab
from tests.conftest import tiny_splits
from tests.hostile.conftest import TINY
from vaelab import evaluate as ev
from vaelab import metrics, models, rundir
from vaelab.checkpoint import CheckpointError, load, load_train_state, read_metrics
from vaelab.config import ConfigError, load_config
from vaelab.report import draw, figures, html
from vaelab.rundir import RunDirError, written_by_vaelab

STATE = Path("state") / "train_state.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished run (a VAE on 100 random 28x28 digits, one epoch), made once."""
    home = tmp_path_factory.mktemp("units")
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (200, 784)), np.arange(200)[:, None] % 10], 1)
    np.savetxt(home / "digits.csv", rows, fmt="%d", delimiter=",")
    overrides = [
        f"data.root={home / 'digits.csv'}",
        f"data.cache_dir={home / 'cache'}",
        "train.progress=false",
        *TINY,
    ]
    return vaelab.train(load_config(overrides=overrides), home / "run")


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


# -- 1-3: reading YAML -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("+.5", 0.5), ("2.5e-4", 2.5e-4), ("3", 3.0)],
)
def test_yaml_floats_are_read_as_yaml_1_2_reads_them(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    assert load_config(path).train.lr == value


def test_yaml_text_stays_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: e5\n  name: mnist5k\n")
    assert load_config(path).data.root == "e5"
    path.write_text("data:\n  root: 1e5\n")  # a number now, as in YAML 1.2: quotes make text
    with pytest.raises(ConfigError) as err:
        load_config(path)
    one_line(err, "data.root", "quotes")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train:\n  lr: 0.1\n  lr: 0.2\n", ["'train.lr'", "lines 2 and 3"]),
        ("train: {lr: 0.1, lr: 0.2}\n", ["'train.lr'", "lines 1 and 1"]),
        ("train:\n  epochs: 2\ntrain:\n  lr: 0.1\n", ["'train'", "lines 1 and 3"]),
        ("model:\n  widths: [1]\n  name: vae\n  widths: [2]\n", ["'model.widths'"]),
    ],
)
def test_duplicate_yaml_keys_are_refused(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    one_line(err, "c.yaml", "duplicate key", *words)


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {epochs: 2, lr: 0.1}\n")
    text = "train:\n  <<: {epochs: 2, lr: 0.1}\n  lr: 0.2\n"
    path.write_text(text)
    assert load_config(path).train.lr == 0.2


def test_bad_config_files_are_one_line_errors(tmp_path):
    cases = {
        "latin1.yaml": (b"train:\n  lr: 0.1  # \xe9t\xe9\n", "UTF-8"),
        "syntax.yaml": (b"train:\n  lr: [1\n  epochs: 2\n", "line 3"),
        "nul.yaml": (b"train:\n  lr: 0.1\x00\n", "not valid YAML"),
        "deep.yaml": (b"[" * 100_000, "config file"),
    }
    for name, (raw, word) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        one_line(err, name, word)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "folder.yaml")
    one_line(err, "folder.yaml", "folder")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbftrain:\n  lr: 0.5\n")
    assert load_config(tmp_path / "bom.yaml").train.lr == 0.5


# -- 4: options a model ignores ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.likelihood=bernoulli", "model.sigma2=0.1"], "model.sigma2"),
        (["model.name=beta_vae", "model.likelihood=bernoulli", "model.sigma2=2"], "model.sigma2"),
        (["model.name=sigma_vae", "model.sigma2=0.1"], "model.sigma2"),
        (["model.name=decoder_only", "model.free_bits=0.5"], "model.free_bits"),
        (["model.name=decoder_only", "model.likelihood=bernoulli"], "model.likelihood"),
        (["model.name=iwae", "model.free_bits=0.5"], "model.free_bits"),
        (["model.name=beta_vae_capacity", "model.free_bits=0.5"], "model.free_bits"),
    ],
)
def test_an_option_a_model_ignores_is_refused(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    name = next((o.split("=")[1] for o in overrides if o.startswith("model.name=")), "vae")
    one_line(err, f"'{key}'", f"'{name}'")


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.likelihood=bernoulli", "model.sigma2=0.5"],  # the default: cannot tell it was set
        ["model.name=sigma_vae", "model.sigma2=0.5"],
        ["model.name=decoder_only", "model.likelihood=bernoulli", "model.objective=marginal"],
        ["model.name=decoder_only", "model.sigma2=0.1", "model.mc_samples=4"],  # its ELBO uses it
        ["model.name=beta_vae", "model.free_bits=0.5", "model.likelihood=bernoulli"],
        ["model.name=sigma_vae", "model.free_bits=0.5"],
        ["model.name=iwae", "model.mc_samples=7"],
    ],
)
def test_options_a_model_uses_are_accepted(overrides):
    load_config(overrides=overrides)


# -- 5: models too large for the machine -------------------------------------------------------


def test_check_size_counts_the_parameters_without_allocating_them():
    cfg = load_config(overrides=["model.widths=[4,8]", "model.latent_dim=2"]).model
    real = models.build(cfg, (1, 28, 28))
    assert models.check_size(cfg, (1, 28, 28)) == sum(p.numel() for p in real.parameters())
    huge = load_config(overrides=["model.widths=[200000,200000]"]).model
    with pytest.raises(ConfigError) as err:
        models.check_size(huge, (1, 28, 28), training=True)
    one_line(err, "model.widths", "model.latent_dim", "data.size", "GB")


def test_check_size_counts_the_training_copies(monkeypatch):
    cfg = load_config(overrides=["model.widths=[4,8]", "model.latent_dim=2"]).model
    shape = (1, 28, 28)
    params = models.check_size(cfg, shape)
    monkeypatch.setattr(models, "available_memory", lambda: 4 * params * 2)  # 2 copies fit
    models.check_size(cfg, shape, training=False)
    with pytest.raises(ConfigError) as err:
        models.check_size(cfg, shape, training=True)
    one_line(err, "GB to train", "data.size")
    with pytest.raises(ConfigError):
        models.check_size(cfg, (1, 1000, 1000), training=False)  # data.size alone


def test_available_memory_is_known_here():
    have = models.available_memory()
    assert have is not None and have > 2**20


# -- 6, 7: loading a run -----------------------------------------------------------------------


def _edit_weights(path: Path, change) -> None:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, meta)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("decoder.out.weight", math.nan),
        ("encoder.head.bias", math.inf),
        ("decoder.features.0.1.running_var", -math.inf),
    ],
)
def test_weights_that_are_not_finite_are_refused(run, name, value):
    def poison(t):
        t[name].view(-1)[0] = value

    _edit_weights(run / "model.safetensors", poison)
    with pytest.raises(CheckpointError) as err:
        load(run)
    one_line(err, "model.safetensors", f"'{name}'")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"shape": [2, 28, 28]}, ["'shape'", "channels 1 or 3"]),
        ({"shape": ["1", "28", "28"]}, ["'shape'"]),
        ({"shape": [1, 28]}, ["'shape'"]),
        ({"shape": [True, 28, 28]}, ["'shape'"]),
        ({"shape": [1, 0, 28]}, ["'shape'"]),
        ({"shape": None}, ["'shape'"]),
        ({"model": None}, ["'model'"]),
        ({"model": ["vae"]}, ["'model'"]),
        ({"model": {"name": "vae", "widths": "big"}}, ["model.widths"]),
        ({"model": {"name": "nope"}}, ["model.name"]),
        ({"model": {"name": "vae", "latent_dim": 3}}, ["model.safetensors", "shape"]),
        ({"model": {"name": "iwae", "widths": [4, 8], "latent_dim": 2}}, []),  # same tensors
        ({"format": "other"}, ["format"]),
    ],
)
def test_a_tampered_config_json_is_one_line(run, change, words):
    info = json.loads((run / "config.json").read_text())
    info.update(change)
    (run / "config.json").write_text(json.dumps(info))
    if not words:
        assert load(run).cfg.name == change["model"]["name"]
        return
    with pytest.raises(CheckpointError) as err:
        load(run)
    one_line(err, *words)


def test_config_json_that_is_not_text_or_a_mapping(run):
    (run / "config.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(CheckpointError) as err:
        load(run)
    one_line(err, "config.json", "UTF-8")
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError) as err:
        load(run)
    one_line(err, "config.json")


def test_a_weights_file_with_other_tensors_is_refused_before_reading_them(run, monkeypatch):
    _edit_weights(run / "model.safetensors", lambda t: t.pop("decoder.out.bias"))
    built, real = [], models.build

    def spy(*args):
        if torch.empty(0).device.type != "meta":  # a model with real memory
            built.append(args)
        return real(*args)

    monkeypatch.setattr(models, "build", spy)
    with pytest.raises(CheckpointError) as err:
        load(run)
    one_line(err, "model.safetensors", "decoder.out.bias")
    assert not built


# -- 8: the resume state -----------------------------------------------------------------------


def _tamper_state(run: Path, tensors=None, metadata=None) -> None:
    path = run / STATE
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    t = load_file(path)
    if tensors:
        tensors(t)
    if metadata:
        metadata(meta)
    save_file(t, path, meta)


def _resume_into(run: Path):
    model = load(run).train()
    optimizer = torch.optim.Adam(model.parameters())
    return load_train_state(run, model, optimizer)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _counters(**changes):
    def apply(m):
        counters = json.loads(m["counters"])
        counters.update(changes)
        m["counters"] = json.dumps(counters)

    return apply


@pytest.mark.parametrize(
    ("tamper", "words"),
    [
        ({"metadata": _set("counters", "[1]")}, ["'counters'", "mapping"]),
        ({"metadata": _set("counters", "{not json")}, ["'counters'", "JSON"]),
        ({"metadata": lambda m: m.pop("optim_scalars")}, ["'optim_scalars'"]),
        ({"metadata": _counters(epoch="1")}, ["'epoch'"]),
        ({"metadata": _counters(step=-1)}, ["'step'"]),
        ({"metadata": _counters(seconds="long")}, ["'seconds'"]),
        ({"metadata": _counters(grad_scaler={"scale": "big"})}, ["'grad_scaler'"]),
        ({"metadata": _set("param_groups", "{}")}, ["'param_groups'", "list"]),
        ({"metadata": _set("param_groups", "[]")}, ["'param_groups'", "0 groups"]),
        ({"metadata": _set("param_groups", '[{"params": 3}]')}, ["['params']"]),
        ({"metadata": _set("param_groups", '[{"params": [0]}]')}, ["param_groups[0]"]),
        ({"metadata": _set("optim_scalars", '{"x": 1}')}, ["'optim_scalars'"]),
        ({"tensors": lambda t: t.pop("rng.torch")}, ["'rng.torch'"]),
        ({"tensors": lambda t: t.__setitem__("rng.torch", torch.zeros(3))}, ["'rng.torch'"]),
        ({"tensors": lambda t: t.__setitem__("optim.x.y", torch.zeros(3))}, ["'optim.x.y'"]),
        ({"tensors": lambda t: t.__setitem__("optim.999.exp_avg", torch.zeros(3))}, ["999"]),
        ({"tensors": lambda t: t.__setitem__("optim.0.exp_avg", torch.zeros(3))}, ["optim.0"]),
        ({"tensors": lambda t: t["optim.1.exp_avg_sq"].fill_(math.nan)}, ["optim.1.exp_avg_sq"]),
        ({"tensors": lambda t: t.pop("model.decoder.out.bias")}, ["decoder.out.bias"]),
    ],
)
def test_a_tampered_resume_state_is_one_line(run, tamper, words):
    _resume_into(run)  # the untouched state loads
    _tamper_state(run, **tamper)
    with pytest.raises(CheckpointError) as err:
        _resume_into(run)
    one_line(err, "train_state.safetensors", *words)


def test_a_tampered_learning_rate_in_the_state_is_refused(run):
    def groups(m):
        saved = json.loads(m["param_groups"])
        saved[0]["lr"] = "fast"
        saved[0]["betas"] = [0.9]
        m["param_groups"] = json.dumps(saved)

    _tamper_state(run, metadata=groups)
    with pytest.raises(CheckpointError) as err:
        _resume_into(run)
    one_line(err, "param_groups[0]")


def test_metrics_rows_are_checked(run):
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + "[1, 2]\n")
    with pytest.raises(CheckpointError) as err:
        read_metrics(run)
    one_line(err, "metrics.jsonl", "line 3")


# -- 9, 10: evaluate ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -5, 2.5, True])
def test_iw_samples_below_one_is_a_config_error_before_any_work(tmp_path, k):
    with pytest.raises(ConfigError) as err:
        ev.evaluate(tmp_path / "nowhere", iw_samples=k)
    one_line(err, "--iw-samples", "expected an integer >= 1")


def test_evaluate_checks_its_output_folder_before_loading(run, monkeypatch):
    (run / "eval").write_text("not a folder")

    def never(*args, **kwargs):
        raise AssertionError("loaded before the output was checked")

    monkeypatch.setattr(ev, "load", never)
    with pytest.raises(RunDirError) as err:
        ev.evaluate(run, iw_samples=2, progress=False)
    one_line(err, "eval")


class _Bar:
    def __init__(self, total, desc, enabled=True, **kwargs):
        self.total, self.done, self.updates = total, 0, 0
        _Bar.last = self

    def update(self, n):
        self.done += n
        self.updates += 1

    def close(self):
        pass


def test_the_progress_counts_importance_samples_chunk_by_chunk(run, monkeypatch, caplog):
    model = load(run)
    val = draw.run_split(run)
    monkeypatch.setattr(ev.progress_bars, "bar", _Bar)
    monkeypatch.setattr(metrics, "MAX_ELEMENTS", 784 * 100 * 3)  # chunks of 3 samples per batch
    monkeypatch.setattr(ev.progress_bars, "interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="vaelab"):
        ev.evaluate_model(model, val, iw_samples=10, progress=True)
    bar = _Bar.last
    assert bar.total == len(val) * 10 and bar.done == bar.total
    assert bar.updates == 4  # ceil(10 / 3) chunks of the one batch of 100 images
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{len(val)} images" in m and "K = 10" in m for m in lines), lines


# -- 11: outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "option"),
    [
        (lambda r, o: draw.draw_samples(r, o, n=0), "-n"),
        (lambda r, o: draw.draw_samples(r, o, n=-3), "-n"),
        (lambda r, o: draw.draw_samples(r, o, temperature=math.nan), "--temperature"),
        (lambda r, o: draw.draw_samples(r, o, temperature=0.0), "--temperature"),
        (lambda r, o: draw.draw_samples(r, o, temperature=math.inf), "--temperature"),
        (lambda r, o: draw.draw_samples(r, o, seed=2**64), "--seed"),
        (lambda r, o: draw.draw_reconstructions(r, o, n=0), "-n"),
        (lambda r, o: draw.draw_interpolations(r, o, pairs=0), "--pairs"),
        (lambda r, o: draw.draw_interpolations(r, o, steps=-1), "--steps"),
        (lambda r, o: draw.draw_traversal(r, o, dims=0), "--dims"),
        (lambda r, o: draw.draw_traversal(r, o, steps=0), "--steps"),
        (lambda r, o: draw.draw_traversal(r, o, limit=math.nan), "--limit"),
    ],
)
def test_picture_arguments_are_checked_before_any_work(tmp_path, call, option):
    with pytest.raises(ConfigError) as err:
        call(tmp_path / "nowhere", tmp_path / "out.png")
    one_line(err, option)
    assert not (tmp_path / "out.png").exists()


def test_a_grid_too_large_for_a_png_is_refused_before_drawing(run, tmp_path):
    with pytest.raises(ConfigError) as err:
        draw.draw_samples(run, tmp_path / "s.png", n=100_000)
    one_line(err, "-n", "pixels")
    with pytest.raises(ConfigError) as err:
        draw.draw_interpolations(run, tmp_path / "s.png", steps=5000)
    one_line(err, "--steps")
    assert not (tmp_path / "s.png").exists()


def _user_png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="png")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _val(run: Path):
    """A stand-in split for encode: a few random 8x8 grey images (encode reads its own run's)."""
    return tiny_splits().val


OUTPUT_WRITERS = {
    "sample": lambda run, out, **kw: draw.draw_samples(run, out, n=4, **kw),
    "reconstruct": lambda run, out, **kw: draw.draw_reconstructions(run, out, n=4, **kw),
    "interpolate": lambda run, out, **kw: draw.draw_interpolations(run, out, 2, 3, **kw),
    "traverse": lambda run, out, **kw: draw.draw_traversal(run, out, 2, 3, **kw),
    "encode": lambda run, out, **kw: ev.encode(run, out, _val(run), **kw),
    "report": lambda run, out, **kw: html.write_report([run], out, **kw),
}


@pytest.mark.parametrize("name", OUTPUT_WRITERS)
def test_an_output_is_checked_before_the_run_is_read(tmp_path, name):
    out = tmp_path / "mine.out"
    out.write_text("a user's file")
    with pytest.raises(RunDirError) as err:  # not CheckpointError: the run is not read first
        OUTPUT_WRITERS[name](tmp_path / "nowhere", out)
    one_line(err, "mine.out", "--overwrite")
    assert out.read_text() == "a user's file"


@pytest.mark.parametrize("name", OUTPUT_WRITERS)
def test_an_output_never_writes_over_a_run_file(run, name):
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError) as err:
        OUTPUT_WRITERS[name](run, run / "metrics.jsonl", overwrite=True)
    one_line(err, "metrics.jsonl")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_overwrite_replaces_a_users_file_and_a_rerun_replaces_vaelabs(run, tmp_path):
    out = tmp_path / "s.png"
    mine = _user_png(out)
    with pytest.raises(RunDirError):
        draw.draw_samples(run, out, n=4)
    assert out.read_bytes() == mine
    draw.draw_samples(run, out, n=4, overwrite=True)
    assert out.read_bytes() != mine and written_by_vaelab(out)
    first = out.read_bytes()
    draw.draw_samples(run, out, n=8)  # vaelab's own picture: replaced without asking
    assert out.read_bytes() != first


def test_the_sweep_report_checks_its_output_first(tmp_path):
    out = tmp_path / "r.html"
    out.write_text("<html>a user's page</html>")
    with pytest.raises(RunDirError):
        html.write_sweep_report(tmp_path / "nowhere", out)
    assert out.read_text() == "<html>a user's page</html>"


# -- 12: vaelab's own files carry its mark -----------------------------------------------------


def test_every_png_and_html_vaelab_writes_carries_its_mark(run, tmp_path):
    images = torch.rand(4, 1, 8, 8)
    rows = [
        {"split": s, "epoch": 1, "recon": 1.0, "kl": 2.0, "loss": 3.0} for s in ("train", "val")
    ]
    figures.save_grid(images, tmp_path / "grid.png")
    figures.plot_curves(rows, tmp_path / "curves.png")
    figures.save_overview({"vae": [("samples", images, 0)]}, tmp_path / "overview.png")
    (tmp_path / "rd.png").write_bytes(figures.rate_distortion_png([("a", 1.0, 2.0), ("b", 2, 1)]))
    draw.draw_samples(run, tmp_path / "samples.png", n=4)
    html.write_report([run], tmp_path / "report.html")
    for name in ("grid", "curves", "overview", "rd", "samples"):
        path = tmp_path / f"{name}.png"
        head = path.read_bytes()[: 1 << 16]
        assert head.startswith(b"\x89PNG") and rundir.PNG_MARK in head, name
        assert head.index(rundir.PNG_MARK) < head.index(b"IDAT"), name
        assert written_by_vaelab(path), name
    page = (tmp_path / "report.html").read_text()
    assert rundir.HTML_MARK in page.split("</head>")[0]
    assert written_by_vaelab(tmp_path / "report.html")


def test_a_users_png_and_page_are_not_vaelabs(tmp_path):
    _user_png(tmp_path / "pillow.png")
    fig = Figure()
    fig.add_subplot().plot([1, 2])
    fig.savefig(tmp_path / "matplotlib.png")
    (tmp_path / "page.html").write_text("<html><head><title>mine</title></head></html>")
    for name in ("pillow.png", "matplotlib.png", "page.html"):
        assert not written_by_vaelab(tmp_path / name), name


# -- 13: sweep.json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "words"),
    [
        ({"axes": {}, "runs": ["../x"]}, ["'../x'", "folder name"]),
        ({"axes": {}, "runs": ["/etc"]}, ["'/etc'"]),
        ({"axes": {}, "runs": [".."]}, ["'..'"]),
        ({"axes": {}, "runs": ["."]}, ["'.'"]),
        ({"axes": {}, "runs": ["a/b"]}, ["'a/b'"]),
        ({"axes": {}, "runs": ["a\\b"]}, ["folder name"]),
        ({"axes": {}, "runs": [""]}, ["folder name"]),
        ({"axes": {}, "runs": [None]}, ["folder name"]),
        ({"axes": {}, "runs": "abc"}, ["'runs'"]),
        ({"axes": [], "runs": ["a"]}, ["'axes'"]),
        ({"axes": {}, "runs": ["a"], "values": {"a": 1}}, ["'values'"]),
        ([], ["'runs'"]),
    ],
)
def test_a_tampered_sweep_json_is_refused(tmp_path, info, words):
    (tmp_path / "sweep.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError) as err:
        html.sweep_runs(tmp_path)
    one_line(err, "sweep.json", *words)


def test_a_good_sweep_json_names_folders_inside_the_sweep(tmp_path):
    info = {"axes": {"model.beta": [1, 2]}, "runs": ["model.beta=1", "model.beta=2"]}
    (tmp_path / "sweep.json").write_text(json.dumps(info))
    _, runs = html.sweep_runs(tmp_path)
    assert runs == [tmp_path / "model.beta=1", tmp_path / "model.beta=2"]
