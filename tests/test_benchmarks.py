"""The benchmark scripts are run by hand (benchmarks/README.md), so nothing else notices when a
change to vaelab breaks one: each must at least import what it uses from vaelab and parse its
options (``--help``). Their numbers are not measured here."""

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))
LIBRARY = {"peers.py"}  # imported by throughput.py, no command line of its own


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_every_benchmark_script_starts(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])  # its sibling imports
    if script.name in LIBRARY:
        namespace = runpy.run_path(str(script))
        assert callable(namespace["pythae_step"])
        return
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_the_scripts_are_found():  # an empty list would run no test above, silently
    assert len(SCRIPTS) >= 10 and {s.name for s in SCRIPTS} >= LIBRARY | {"serve.py"}
