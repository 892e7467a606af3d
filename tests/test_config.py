import pytest

from vaelab.config import ConfigError, dump_yaml, load_config
from vaelab.models.beta_vae import BetaVAEConfig


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: beta_vae\n  beta: 2\ntrain:\n  epochs: 7\n")
    cfg = load_config(path, ["model.beta=4", "train.lr=3e-4", "model.widths=[8,16,32]"])
    assert isinstance(cfg.model, BetaVAEConfig)
    assert cfg.model.beta == 4.0 and isinstance(cfg.model.beta, float)
    assert cfg.train.epochs == 7
    assert cfg.train.lr == 3e-4
    assert cfg.model.widths == (8, 16, 32)
    assert cfg.data.name == "mnist5k"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(overrides=["model.name=decoder_only", "model.objective=marginal"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.bta=3"], "unknown config key 'model.bta'"),
        (["trian.epochs=3"], "unknown config section 'trian'"),
        (["train.epochs=three"], "config key 'train.epochs': expected int, got 'three'"),
        (["train.epochs=1.5"], "config key 'train.epochs': expected int"),
        (["train.progress=maybe"], "config key 'train.progress': expected bool"),
        (["model.name=beta_vae", "model.beta=x"], "config key 'model.beta': expected float"),
        (["model.name=gan"], "unknown model 'gan'"),
        (["model.objective=mse"], "unknown config key 'model.objective' (model 'vae'"),
        (["model.name=decoder_only", "model.objective=l1"], "'model.objective': expected one of"),
        (["train.epochs=0"], "'train.epochs': expected an integer >= 1"),
        (["epochs"], "expected key=value"),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_command_line_text_keeps_its_meaning():
    cfg = load_config(overrides=["data.root=0123", "model.widths=32", "train.progress=no"])
    assert cfg.data.root == "0123"  # not YAML's octal 83
    assert cfg.model.widths == (32,)
    assert cfg.train.progress is False
    assert load_config(overrides=["data.root=no"]).data.root == "no"
    assert load_config(overrides=["model.widths=[8, 16]"]).model.widths == (8, 16)


@pytest.mark.parametrize(
    "override", ["train.lr=inf", "model.sigma2=nan", "model.sigma2=0", "train.lr=-1"]
)
def test_non_finite_or_non_positive_numbers_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=override.split())
    with pytest.raises(ConfigError, match="model.beta"):
        load_config(overrides=["model.name=beta_vae", "model.beta=inf"])


def test_yaml_values_are_type_checked_and_sections_must_be_mappings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: 3\n")
    with pytest.raises(ConfigError, match=r"'data.root': expected str, got 3 \(int\)"):
        load_config(path)
    path.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="section 'model' is not a mapping"):
        load_config(path, ["model.beta=4"])
    path.write_text("model:\n  # name: vae\ntrain:\n  lr: 1\n")
    cfg = load_config(path)
    assert cfg.model.name == "vae" and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_dataclasses_built_in_python_are_type_checked():
    from vaelab.config import TrainConfig

    with pytest.raises(ConfigError, match="'train.epochs': expected int, got 2.5"):
        TrainConfig(epochs=2.5)  # type: ignore[arg-type]
    assert TrainConfig(lr=1).lr == 1.0


def test_text_that_yaml_1_2_reads_as_a_number_survives_a_round_trip(tmp_path):
    from vaelab.config import dump_yaml, load_config

    cfg = load_config(overrides=["data.root=1e5", "data.cache_dir=.5"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert (again.data.root, again.data.cache_dir) == ("1e5", ".5")
