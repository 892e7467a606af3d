"""The hostile-input suite: the command line run as a careless or hostile user would run it.

Every case runs ``python -m vaelab ...`` in a subprocess and checks what a user sees and what is
left on disk: the exit code, one line naming the problem (never a traceback), and that no file
that existed before changed and nothing was written outside the folder the command was given.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

TIMEOUT = 300


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Result:
    """``vaelab ARGS`` as a user runs it, with the output not a terminal (as in CI or a log)."""
    environ = {**os.environ, "VAELAB_CACHE": str(cwd / ".cache-vaelab"), **(env or {})}
    environ.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "vaelab", *map(str, args)],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def snapshot(root: Path, skip: Iterable[str] = (".cache-vaelab",)) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir', the link target, 'lock') of everything under ``root``."""
    out: dict[str, str] = {}
    skip = set(skip)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if (rel_dir / d).as_posix() not in skip]
        for name in dirnames:
            out[(rel_dir / name).as_posix()] = "dir"
        for name in filenames:
            path = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif name == ".vaelab.lock":  # vaelab's own; it holds the pid of the last holder
                out[rel] = "lock"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def assert_refused(result: Result, *words: str) -> str:
    """Exit code 2, the last line of standard error 'vaelab: error: ...' naming ``words``, and
    no traceback anywhere. Returns the message."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert result.code == 2, (result.code, result.stderr[-3000:])
    assert result.lines, "no message"
    last = result.lines[-1]
    assert last.startswith("vaelab: error: "), result.stderr[-3000:]
    for word in words:
        assert word in last, (word, last)
    return last


def assert_unchanged(before: dict[str, str], root: Path, allowed: Iterable[str] = ()) -> None:
    """Every path of ``before`` is still there with the same content, and nothing new appeared
    under ``root`` except below the ``allowed`` prefixes."""
    after = snapshot(root)
    allowed = tuple(allowed)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"changed or removed: {changed}"
    new = sorted(
        k
        for k in after
        if k not in before and not any(k == a or k.startswith(a + "/") for a in allowed)
    )
    assert not new, f"written: {new}"


TINY = [
    "model.widths=[4,8]",
    "model.latent_dim=2",
    "train.batch_size=64",
    "train.epochs=1",
    "data.val_fraction=0.5",
]


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CSV in mnist5k's format (784 pixel columns, then the label): 200 images."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (200, 784)), np.arange(200)[:, None] % 10], axis=1)
    path = tmp_path_factory.mktemp("digits") / "digits.csv"
    np.savetxt(path, rows, fmt="%d", delimiter=",")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, digits_csv: Path) -> Path:
    """One finished tiny run (a VAE on 100 digits, one epoch), made once: tests copy it."""
    home = tmp_path_factory.mktemp("trained")
    result = run_cli("train", "--out", "run", f"data.root={digits_csv}", *TINY, cwd=home)
    assert result.code == 0, result.stderr[-3000:]
    return home / "run"


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the trained run in this test's folder."""
    import shutil

    return Path(shutil.copytree(trained_run, tmp_path / "run"))
