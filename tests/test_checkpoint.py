import json
import pickle

import pytest
import torch

import vaelab
from tests.conftest import tiny_config
from vaelab.checkpoint import CheckpointError, atomic_write, load


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
