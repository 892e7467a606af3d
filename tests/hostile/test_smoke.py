from tests.hostile.conftest import run_cli


def test_the_trained_run_fixture_is_a_run(trained_run):
    assert (trained_run / "model.safetensors").is_file()
    assert (trained_run / "state" / "train_state.safetensors").is_file()


def test_a_bad_key_is_one_line(tmp_path):
    from tests.hostile.conftest import assert_refused

    assert_refused(run_cli("config", "model.bta=3", cwd=tmp_path), "model.bta")
