import json
import pickle
from dataclasses import dataclass

import pytest
import torch
import yaml

import vaelab
from tests.conftest import tiny_config
from vaelab.checkpoint import (
    CheckpointError,
    atomic_write,
    load,
    model_info,
    read_metrics,
    run_config,
)
from vaelab.config import MODEL_CONFIGS, load_config
from vaelab.models.vae import VAEConfig


@pytest.fixture
def run(tmp_path, splits):
    return vaelab.train(tiny_config("train.epochs=1"), tmp_path / "run", splits=splits)


def test_round_trip_gives_identical_outputs(run, splits):
    a = load(run)
    z = torch.randn(3, 2)
    # Identical to the model that training ended with (kept in the resume state).
    from vaelab import models
    from vaelab.checkpoint import load_train_state

    fresh = models.build(a.cfg, a.shape)
    load_train_state(run, fresh, torch.optim.Adam(fresh.parameters()))
    fresh.eval()
    assert torch.equal(fresh.decode(z), a.decode(z))


def test_loaded_model_is_ready_to_use(run):
    model = load(run)
    assert not model.training
    assert model.sample(4).shape == (4, 1, 8, 8)
    assert model.cfg.name == "vae"


def test_loading_never_unpickles(run, monkeypatch):
    info = json.loads((run / "config.json").read_text())
    assert info["model"]["name"] == "vae" and info["shape"] == [1, 8, 8]

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = load(run)
    assert model.sample(2).shape == (2, 1, 8, 8)
    from vaelab import models
    from vaelab.checkpoint import load_train_state

    fresh = models.build(model.cfg, model.shape)
    load_train_state(run, fresh, torch.optim.Adam(fresh.parameters()))


def test_bad_checkpoints_give_clear_errors(run, tmp_path):
    with pytest.raises(CheckpointError, match="config.json' not found"):
        load(tmp_path / "nowhere")
    weights = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has not finished an epoch yet"):
        load(run)
    (run / "model.safetensors").write_bytes(weights)
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors': not a readable safetensors"):
        load(run)
    (run / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json': not valid JSON"):
        load(run)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_a_run_records_its_decoders_upsampling(tmp_path, splits, upsample):
    cfg = tiny_config("train.epochs=1", f"model.upsample={upsample}")
    run = vaelab.train(cfg, tmp_path / "run", splits=splits)
    assert json.loads((run / "config.json").read_text())["model"]["upsample"] == upsample
    assert run_config(run).model.upsample == upsample
    model = load(run)
    assert model.cfg.upsample == upsample
    kinds = {type(m) for m in model.decoder.modules()}
    assert (torch.nn.ConvTranspose2d in kinds) == (upsample == "transpose")


def test_a_run_saved_before_upsample_existed_loads_and_resumes_transposed(
    tmp_path, splits, monkeypatch
):
    """config.json and config.yaml without model.upsample (every run before the key): the run
    rebuilds the transposed decoder it trained, also once the default is resize."""
    cfg = tiny_config("train.epochs=1", "model.upsample=transpose")
    run = vaelab.train(cfg, tmp_path / "old", splits=splits)
    z = torch.randn(3, 2)
    before = load(run).decode(z)
    info = json.loads((run / "config.json").read_text())
    del info["model"]["upsample"]
    (run / "config.json").write_text(json.dumps(info))
    tree = yaml.safe_load((run / "config.yaml").read_text())
    del tree["model"]["upsample"]
    (run / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))

    @dataclass(frozen=True)
    class Later(VAEConfig):  # the vae's config after a change of default
        upsample: str = "resize"

    monkeypatch.setitem(MODEL_CONFIGS, "vae", Later)
    assert load_config().model.upsample == "resize"  # a new run would get the new default
    assert model_info(run)[0].upsample == "transpose"
    assert run_config(run).model.upsample == "transpose"
    old = load(run)
    assert old.cfg.upsample == "transpose"
    assert torch.equal(old.decode(z), before)
    # resuming builds the same decoder (a resize one would not take the saved state's tensors)
    vaelab.resume(run, ["train.epochs=2"], splits=splits)
    assert read_metrics(run)[-1]["epoch"] == 2
    assert load(run).cfg.upsample == "transpose"
