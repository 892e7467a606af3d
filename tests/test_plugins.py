"""Your own networks and models: vaelab.nets.register, vaelab.models.register, `--plugin
FILE.py`, and the plugin a run records.

The net plugin trained here is the one docs/extending.md shows, so the documented file works."""

import argparse
import hashlib
import importlib
import json
import logging
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import vaelab
from vaelab import checkpoint, models, nets
from vaelab.checkpoint import CheckpointError
from vaelab.cli import build_parser, main, parse_args
from vaelab.config import MODEL_CONFIGS, NET_UPSAMPLES, ConfigError, load_config
from vaelab.models import MODELS, SOURCES, VAE
from vaelab.nets import BUILT_IN, NETS, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from vaelab.plugins import PluginError, load_plugin
from vaelab.trainer import read_metrics

DOCS = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
TINY = [
    "model.widths=[4,8]",
    "model.latent_dim=2",
    "train.batch_size=16",
    "train.epochs=1",
    "train.progress=false",
]
EVAL = ["--iw-samples", "2", "--images", "16", "--quiet"]
PLUGIN_MODULES = ("my_nets", "my_model")
MODEL = "plugin_tc_vae"  # the model of MODEL_PLUGIN; plugin_... names are unregistered per test
MODEL_PLUGIN = f'''"""my_model.py: a VAE with a term of its own, as model.name={MODEL}."""

from dataclasses import dataclass

import torch

from vaelab.config import ModelConfig
from vaelab.models import VAE, ModelOutput, StepContext, register


@dataclass(frozen=True)
class TCConfig(ModelConfig):
    name: str = "{MODEL}"
    tc_weight: float = 0.5


@register("{MODEL}", TCConfig)
class TCVAE(VAE):
    def forward(self, x: torch.Tensor, ctx: StepContext | None = None) -> ModelOutput:
        out = super().forward(x, ctx)
        tc = out.posterior.mu.square().sum(-1)
        return ModelOutput(
            loss=out.loss + self.cfg.tc_weight * tc,
            elbo=out.elbo,
            terms={{**out.terms, "tc": tc}},
            posterior=out.posterior,
        )
'''


def documented_plugin() -> str:
    """The plugin file of docs/extending.md's "Your own networks"."""
    text = DOCS.read_text(encoding="utf-8")
    (code,) = [
        block
        for block in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
        if "vaelab.nets.register(" in block
    ]
    return code


def forget_plugins() -> None:
    """Unregister every net that is not built in and every model of this module (named
    plugin_...), and forget the plugin modules imported."""
    for name in set(NETS) - BUILT_IN:
        del NETS[name]
        del NET_UPSAMPLES[name]
    for name in [n for n in MODELS if n.startswith("plugin_")]:
        del MODELS[name], MODEL_CONFIGS[name]
        SOURCES.pop(name, None)
    imported = [m for m in sys.modules if m.startswith("_vaelab_plugin_") or m in PLUGIN_MODULES]
    for module in imported:
        del sys.modules[module]
    checkpoint._WARNED.clear()


@pytest.fixture(autouse=True)
def clean_registry():
    forget_plugins()
    yield
    forget_plugins()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of model.net=mine, trained from the command line with the documented plugin."""
    folder = tmp_path_factory.mktemp("plugin")
    plugin = folder / "my_nets.py"
    plugin.write_text(documented_plugin(), encoding="utf-8")
    run = folder / "run"
    forget_plugins()
    assert main(["train", "--plugin", str(plugin), "--out", str(run), "model.net=mine", *TINY]) == 0
    forget_plugins()
    return run, plugin


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("vaelab: error: ") and err.count("\n") == 1, err
    return err.strip()


def test_a_plugin_net_trains_and_the_run_records_its_file(trained):
    run, plugin = trained
    info = json.loads((run / "config.json").read_text())
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert info["model"]["net"] == "mine"
    assert info["plugins"] == [{"net": "mine", "file": "my_nets.py", "sha256": digest}]
    line = next(x for x in (run / "config.yaml").read_text().splitlines() if "net:" in x)
    assert line == (
        f"  net: mine  # from the plugin my_nets.py (sha256 {digest}): pass --plugin my_nets.py"
    )
    assert read_metrics(run)[-1]["epoch"] == 1


def refused_by_every_command(run: Path, expected: str, capsys) -> None:
    """evaluate, sample and resume each stop with ``expected`` (one line), having done nothing."""
    assert main(["evaluate", str(run), *EVAL]) == 2
    assert one_line_error(capsys) == expected
    assert main(["sample", str(run), "--out", str(run.parent / "s.png")]) == 2
    assert one_line_error(capsys) == expected
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    assert one_line_error(capsys) == expected
    assert not (run.parent / "s.png").exists() and read_metrics(run)[-1]["epoch"] == 1


def test_loading_without_the_plugin_is_a_one_line_error(trained, capsys):
    run, _ = trained
    expected = (
        f"vaelab: error: '{run / 'config.json'}': model.net 'mine' comes from the plugin "
        "my_nets.py: pass --plugin my_nets.py (in Python: import it before loading)"
    )
    refused_by_every_command(run, expected, capsys)
    with pytest.raises(CheckpointError, match="comes from the plugin my_nets.py"):
        vaelab.load(run)


def test_with_the_plugin_the_commands_load_the_run(trained, capsys):
    run, plugin = trained
    assert main(["evaluate", str(run), "--plugin", str(plugin), *EVAL]) == 0
    assert json.loads((run / "eval" / "val.json").read_text())["num_images"] == 16
    out = run.parent / "samples.png"
    assert main(["sample", str(run), "-n", "4", "--out", str(out), "--plugin", str(plugin)]) == 0
    assert out.is_file()
    assert "vaelab: error" not in capsys.readouterr().err


def test_python_loads_the_run_after_importing_the_plugin(trained, monkeypatch, capsys):
    run, plugin = trained
    monkeypatch.syspath_prepend(str(plugin.parent))
    importlib.import_module("my_nets")  # `import my_nets`
    model = vaelab.load(run)
    assert type(model.encoder).__name__ == "MyEncoder"
    assert type(model.decoder).__name__ == "MyDecoder"
    assert any(isinstance(m, nn.LayerNorm) for m in model.decoder.modules())
    assert model.sample(3).shape == (3, 1, 28, 28)
    # the same file again, through --plugin: the same pair, not a second registration
    assert main(["evaluate", str(run), "--plugin", str(plugin), *EVAL]) == 0
    assert "vaelab: error" not in capsys.readouterr().err


def test_resume_takes_the_plugin(trained, tmp_path, capsys):
    run, plugin = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["train", "--resume", str(copy), "--plugin", str(plugin), "train.epochs=2"]) == 0
    assert [r["epoch"] for r in read_metrics(copy) if r["split"] == "val"] == [1, 2]
    assert json.loads((copy / "config.json").read_text())["plugins"][0]["file"] == "my_nets.py"
    assert "# from the plugin my_nets.py" in (copy / "config.yaml").read_text()


def test_a_changed_plugin_warns_and_loads(trained, tmp_path, caplog, capsys):
    run, plugin = trained
    changed = tmp_path / "my_nets.py"
    changed.write_text(plugin.read_text() + "# a comment: another digest\n")
    with caplog.at_level(logging.WARNING, logger="vaelab"):
        assert main(["evaluate", str(run), "--plugin", str(changed), *EVAL]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    old = hashlib.sha256(plugin.read_bytes()).hexdigest()[:12]
    assert "the plugin my_nets.py changed since the run was trained" in warning
    assert old in warning and "loading it anyway" in warning and "\n" not in warning
    # networks that no longer fit the weights: refused by load's own checks, in one line
    forget_plugins()
    other = tmp_path / "other" / "my_nets.py"
    other.parent.mkdir()
    other.write_text(plugin.read_text().replace("nn.SiLU()", "nn.SiLU(), nn.Linear(b, b)"))
    assert main(["evaluate", str(run), "--plugin", str(other), *EVAL]) == 2
    assert "tensors do not match" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("name", "text", "why"),
    [
        ("missing.py", None, "plugin '{f}' not found"),
        ("syntax.py", "def f(:\n", "plugin '{f}': cannot import it (line 1: SyntaxError: "),
        (
            "raises.py",
            "import math\nraise RuntimeError('boom')\n",
            "plugin '{f}': cannot import it (line 2: RuntimeError: boom)",
        ),
        (
            "imports.py",
            "import no_such_module_here\n",
            "plugin '{f}': cannot import it (line 1: ModuleNotFoundError: No module named",
        ),
        (
            "twice.py",
            "import vaelab.nets\nfrom vaelab.nets import MLPDecoder, MLPEncoder\n"
            "vaelab.nets.register('conv', encoder=MLPEncoder, decoder=MLPDecoder)\n",
            "plugin '{f}': cannot import it (line 3: ValueError: net 'conv' is registered twice "
            "(built in))",
        ),
        ("nets.txt", "x = 1\n", "plugin '{f}': expected a Python file (.py)"),
        ("folder", "", "plugin '{f}' is a folder: expected a Python file (.py)"),
    ],
)
def test_a_plugin_that_cannot_be_imported_is_a_one_line_error(name, text, why, tmp_path, capsys):
    f = tmp_path / name
    if name == "folder":
        f.mkdir()
    elif text is not None:
        f.write_text(text)
    run = tmp_path / "run"
    assert main(["train", "--plugin", str(f), "--out", str(run), "model.net=mine", *TINY]) == 2
    assert one_line_error(capsys).startswith("vaelab: error: " + why.format(f=f))
    assert not run.exists()
    assert not [m for m in sys.modules if m.startswith("_vaelab_plugin_")]  # none half imported
    with pytest.raises(PluginError):
        load_plugin(f)


class Encoder(nn.Linear):
    def __init__(self, shape, widths, out_dim):
        super().__init__(shape[0] * shape[1] * shape[2], out_dim)

    def forward(self, x):
        return super().forward(x.flatten(1))


class Decoder(nn.Module):
    def __init__(self, shape, widths, latent_dim, upsample="transpose"):
        super().__init__()
        self.shape, self.upsample = shape, upsample
        self.linear = nn.Linear(latent_dim, shape[0] * shape[1] * shape[2])

    def forward(self, z):
        return self.linear(z).unflatten(1, self.shape)


def test_register_a_pair_in_python():
    nets.register("linear", encoder=Encoder, decoder=Decoder)
    nets.register("linear", encoder=Encoder, decoder=Decoder)  # the same pair again: fine
    with pytest.raises(ValueError, match=r"^net 'linear' is registered twice \(first from"):
        nets.register("linear", encoder=MLPEncoder, decoder=Decoder)
    with pytest.raises(ValueError, match=r"^net 'mlp' is registered twice \(built in\)$"):
        nets.register("mlp", encoder=Encoder, decoder=Decoder)
    with pytest.raises(TypeError, match="decoder must be callable"):
        nets.register("bad", encoder=Encoder, decoder=None)
    assert "bad" not in NETS
    model = vaelab.models.build(load_config(overrides=["model.net=linear"]).model, (1, 8, 8))
    assert isinstance(model.encoder, Encoder) and isinstance(model.decoder, Decoder)
    assert nets.plugin_record("linear") == {
        "net": "linear",
        "file": "test_plugins.py",
        "sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    # a decoder that does not take model.upsample: the key is refused, not ignored
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.net=linear", "model.upsample=resize"])
    assert str(err.value).startswith(
        "config key 'model.upsample': model 'vae' does not use it (the decoder of net 'linear' "
        "does not take it)"
    )
    # one that does is registered with upsample=True and gets it as a fourth argument
    nets.register("linear_up", encoder=Encoder, decoder=Decoder, upsample=True)
    cfg = load_config(overrides=["model.net=linear_up", "model.upsample=resize"]).model
    assert vaelab.models.build(cfg, (1, 8, 8)).decoder.upsample == "resize"


def test_an_unknown_net_names_the_key_the_nets_and_the_plugin_option():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.net=mine"])
    assert str(err.value) == (
        "config key 'model.net': unknown net 'mine' (known: conv, mlp); a net of your own needs "
        "its file: --plugin FILE.py (in Python: import it first)"
    )


def test_the_built_in_nets_are_registered_pairs(runs):
    assert sorted(BUILT_IN) == ["conv", "mlp"]
    assert (NETS["conv"].encoder, NETS["conv"].decoder, NETS["conv"].upsample) == (
        ConvEncoder,
        ConvDecoder,
        True,
    )
    assert (NETS["mlp"].encoder, NETS["mlp"].decoder, NETS["mlp"].upsample) == (
        MLPEncoder,
        MLPDecoder,
        False,
    )
    assert nets.plugin_record("conv") is None and nets.plugin_record("mlp") is None
    made, _ = runs
    info = json.loads((made["vae"] / "config.json").read_text())
    assert info["model"]["net"] == "conv" and "plugins" not in info
    assert "# from the plugin" not in (made["vae"] / "config.yaml").read_text()
    decoder = nets.build_decoder(load_config(overrides=["model.upsample=resize"]).model, (1, 8, 8))
    assert any(isinstance(m, nn.Upsample) for m in decoder.modules())
    assert decoder(torch.zeros(2, 16)).shape == (2, 1, 8, 8)


def test_every_command_that_reads_a_config_or_a_run_takes_plugins():
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    with_plugin = {
        name
        for name, p in sub.choices.items()
        if any("--plugin" in a.option_strings for a in p._actions)
    }
    assert with_plugin == set(sub.choices) - {"env", "demo"}
    args = parse_args(["evaluate", "RUN", "--plugin", "a.py", "--plugin", "b.py"])
    assert args.plugin == ["a.py", "b.py"]
    assert parse_args(["train", "--out", "R", "model.net=mine", "--plugin", "a.py"]).plugin == [
        "a.py"
    ]


def test_config_prints_a_plugin_net(trained, capsys):
    _, plugin = trained
    assert main(["config", "--plugin", str(plugin), "model.net=mine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["net"] == "mine"


# -- a model of a plugin: vaelab.models.register in a file passed with --plugin ----------------


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A run of model.name=plugin_tc_vae, trained from the command line with its plugin."""
    folder = tmp_path_factory.mktemp("plugin_model")
    plugin = folder / "my_model.py"
    plugin.write_text(MODEL_PLUGIN, encoding="utf-8")
    run = folder / "run"
    forget_plugins()
    args = ["--out", str(run), f"model.name={MODEL}", "model.tc_weight=2", *TINY]
    assert main(["train", "--plugin", str(plugin), *args]) == 0
    forget_plugins()
    return run, plugin


def test_a_plugin_model_trains_and_the_run_records_its_file(trained_model):
    run, plugin = trained_model
    info = json.loads((run / "config.json").read_text())
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert info["model"]["name"] == MODEL and info["model"]["tc_weight"] == 2
    assert info["plugins"] == [{"model": MODEL, "file": "my_model.py", "sha256": digest}]
    assert "tc" in read_metrics(run)[-1] and read_metrics(run)[-1]["epoch"] == 1
    assert (
        f"  name: {MODEL}  # from the plugin my_model.py (sha256 {digest}): pass --plugin "
        "my_model.py"
    ) in (run / "config.yaml").read_text()


def test_loading_a_plugin_model_without_the_plugin_is_a_one_line_error(trained_model, capsys):
    run, _ = trained_model
    expected = (
        f"vaelab: error: '{run / 'config.json'}': model.name '{MODEL}' comes from the plugin "
        "my_model.py: pass --plugin my_model.py (in Python: import it before loading)"
    )
    refused_by_every_command(run, expected, capsys)
    with pytest.raises(CheckpointError, match="model.name 'plugin_tc_vae' comes from the plugin"):
        vaelab.load(run)
    with pytest.raises(CheckpointError, match="pass --plugin my_model.py"):
        checkpoint.run_config(run)


def test_with_the_plugin_a_plugin_model_run_evaluates_resumes_and_loads(
    trained_model, tmp_path, monkeypatch, capsys
):
    run, plugin = trained_model
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["evaluate", str(copy), "--plugin", str(plugin), *EVAL]) == 0
    assert json.loads((copy / "eval" / "val.json").read_text())["num_images"] == 16
    assert main(["train", "--resume", str(copy), "--plugin", str(plugin), "train.epochs=2"]) == 0
    assert [r["epoch"] for r in read_metrics(copy) if r["split"] == "val"] == [1, 2]
    assert json.loads((copy / "config.json").read_text())["plugins"][0]["model"] == MODEL
    assert "vaelab: error" not in capsys.readouterr().err
    # in Python: import the file, then load
    forget_plugins()
    monkeypatch.syspath_prepend(str(plugin.parent))
    importlib.import_module("my_model")  # `import my_model`
    model = vaelab.load(copy)
    assert type(model).__name__ == "TCVAE" and model.cfg.tc_weight == 2
    assert models.plugin_record(MODEL) == {
        "model": MODEL,
        "file": "my_model.py",
        "sha256": hashlib.sha256(plugin.read_bytes()).hexdigest(),
    }


def test_a_changed_plugin_model_warns_once_and_loads(trained_model, tmp_path, caplog, capsys):
    run, plugin = trained_model
    changed = tmp_path / "my_model.py"
    changed.write_text(plugin.read_text() + "# a comment: another digest\n")
    with caplog.at_level(logging.WARNING, logger="vaelab"):
        assert main(["evaluate", str(run), "--plugin", str(changed), *EVAL]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    old = hashlib.sha256(plugin.read_bytes()).hexdigest()[:12]
    new = hashlib.sha256(changed.read_bytes()).hexdigest()[:12]
    assert f"model.name '{MODEL}': the plugin my_model.py changed since the run was trained" in (
        warning
    )
    assert old in warning and new in warning and "loading it anyway" in warning
    assert "\n" not in warning and "vaelab: error" not in capsys.readouterr().err


def test_a_run_of_a_plugin_model_and_a_plugin_net_records_both(trained, tmp_path, capsys):
    _, nets_file = trained
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_PLUGIN)
    run = tmp_path / "run"
    both = ["--plugin", str(model_file), "--plugin", str(nets_file)]
    args = ["--out", str(run), f"model.name={MODEL}", "model.net=mine", *TINY]
    assert main(["train", *both, *args]) == 0
    digest = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (model_file, nets_file)}
    assert json.loads((run / "config.json").read_text())["plugins"] == [
        {"model": MODEL, "file": "my_model.py", "sha256": digest["my_model.py"]},
        {"net": "mine", "file": "my_nets.py", "sha256": digest["my_nets.py"]},
    ]
    forget_plugins()
    for given, missing in ((nets_file, "my_model.py"), (model_file, "my_nets.py")):
        assert main(["evaluate", str(run), "--plugin", str(given), *EVAL]) == 2
        assert f"pass --plugin {missing} (in Python" in one_line_error(capsys)
        forget_plugins()
    assert main(["evaluate", str(run), *both, *EVAL]) == 0
    assert "vaelab: error" not in capsys.readouterr().err


class LinearVAE(VAE):
    """A model registered from this file, in Python."""


class OtherVAE(VAE):
    pass


def test_register_a_model_in_python_records_its_file(runs, tmp_path, monkeypatch):
    models.register("plugin_linear")(LinearVAE)
    models.register("plugin_linear")(LinearVAE)  # the same class again: fine
    with pytest.raises(ValueError, match="^model 'plugin_linear' is registered twice$"):
        models.register("plugin_linear")(OtherVAE)
    assert models.plugin_record("plugin_linear") == {
        "model": "plugin_linear",
        "file": "test_plugins.py",
        "sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    assert models.plugin_record("vae") is None and models.plugin_record("nowhere") is None
    assert "vae" not in SOURCES and SOURCES["plugin_linear"].file == Path(__file__).resolve()
    # registered by code outside a file: recorded without one, and loading says to register it
    monkeypatch.setitem(sys.modules, "no_file", types.ModuleType("no_file"))
    nowhere = type("Nowhere", (VAE,), {"__module__": "no_file"})
    exec("models.register('plugin_nowhere')(cls)", {"models": models, "cls": nowhere})
    assert models.plugin_record("plugin_nowhere") == {"model": "plugin_nowhere", "file": ""}
    # a plugin that registers a class defined in a module it imports: the plugin is the file
    # to pass with --plugin, so it is the one recorded (as for a net)
    (tmp_path / "plugin_helpers.py").write_text(
        "from vaelab.models import VAE\n\nclass HelperVAE(VAE):\n    pass\n"
    )
    registering = tmp_path / "registers_it.py"
    registering.write_text(
        "import sys\nsys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))\n"
        "from plugin_helpers import HelperVAE\nfrom vaelab import models\n"
        "models.register('plugin_helper')(HelperVAE)\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))  # the plugin's insert is undone
    try:
        load_plugin(registering)
    finally:
        sys.modules.pop("plugin_helpers", None)
    assert models.plugin_record("plugin_helper")["file"] == "registers_it.py"
    info = {"model": {"name": "plugin_gone"}, "plugins": [{"model": "plugin_gone", "file": ""}]}
    with pytest.raises(CheckpointError, match=r"vaelab\.models\.register\) before loading$"):
        checkpoint.check_plugins(tmp_path / "config.json", info)
    # a run of built-in models records no plugin and loads as before
    made, _ = runs
    assert "plugins" not in json.loads((made["vae"] / "config.json").read_text())
    assert vaelab.load(made["vae"]).cfg.name == "vae"
