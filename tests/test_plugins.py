"""Your own networks: vaelab.nets.register, `--plugin FILE.py`, and the plugin a run records.

The plugin trained here is the one docs/extending.md shows, so the documented file works."""

import argparse
import hashlib
import importlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vaelab
from vaelab import checkpoint, nets
from vaelab.checkpoint import CheckpointError
from vaelab.cli import build_parser, main, parse_args
from vaelab.config import NET_UPSAMPLES, ConfigError, load_config
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
    """Unregister every net that is not built in, and forget the plugin modules imported."""
    for name in set(NETS) - BUILT_IN:
        del NETS[name]
        del NET_UPSAMPLES[name]
    for module in [m for m in sys.modules if m.startswith("_vaelab_plugin_") or m == "my_nets"]:
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


def test_loading_without_the_plugin_is_a_one_line_error(trained, capsys):
    run, _ = trained
    expected = (
        f"vaelab: error: '{run / 'config.json'}': model.net 'mine' comes from the plugin "
        "my_nets.py: pass --plugin my_nets.py (in Python: import it before loading)"
    )
    assert main(["evaluate", str(run), *EVAL]) == 2
    assert one_line_error(capsys) == expected
    assert main(["sample", str(run), "--out", str(run.parent / "s.png")]) == 2
    assert one_line_error(capsys) == expected
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    assert one_line_error(capsys) == expected
    assert not (run.parent / "s.png").exists() and read_metrics(run)[-1]["epoch"] == 1
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
