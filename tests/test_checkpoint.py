import json

import pytest
import torch

import vaelab
from tests.conftest import tiny_config
from vaelab.checkpoint import CheckpointError, atomic_write, load


@pytest.fixture
def run(tmp_path, splits):
    return vaelab.train(tiny_config("train.epochs=1"), tmp_path / "run", splits=splits)


def test_round_trip_gives_identical_outputs(run, splits):
    a, b = load(run), load(run)
    x = splits.val.batch(slice(0, 4))
    torch.testing.assert_close(a.encode(x).mu, b.encode(x).mu, rtol=0, atol=0)
    z = torch.randn(3, 2)
    assert torch.equal(a.decode(z), b.decode(z))
    # ... and identical to the model that training ended with (kept in the resume state).
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


def test_checkpoint_files_are_json_and_safetensors_not_pickle(run):
    info = json.loads((run / "config.json").read_text())
    assert info["model"]["name"] == "vae" and info["shape"] == [1, 8, 8]
    for path in [run / "model.safetensors", run / "state" / "train_state.safetensors"]:
        raw = path.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert all("dtype" in v for k, v in header.items() if k != "__metadata__")
        assert b"\x80\x04" not in raw[:2]  # no pickle protocol marker at the start


def test_bad_checkpoints_give_clear_errors(run, tmp_path):
    with pytest.raises(CheckpointError, match="config.json' not found"):
        load(tmp_path / "nowhere")
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
