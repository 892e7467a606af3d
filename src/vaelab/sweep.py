"""Sweeps: one training per value (or per combination of values) of some config keys.

    vaelab sweep [CONFIG] --out DIR model.beta=0.5,1,4 [key=value ...]

A value with commas is a sweep axis (write a list value as [a,b] to keep it one value). Each
run is an ordinary run directory DIR/<key=value>[_<key=value>...]; DIR/sweep.json lists them.
A name is always one folder inside DIR: characters other than letters, digits and ``._=,+-``
become ``_`` (then a short hash of the values keeps names apart), so no value can reach outside
DIR (``data.root=../..`` is a folder named ``data.root=.._..-<hash>``).
Running the same command again skips finished runs and resumes interrupted ones, so a sweep
is as resumable as a single run. Every config is checked before the first run starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

from vaelab import data, rundir
from vaelab.config import ConfigError, RunConfig, load_config
from vaelab.trainer import resume, train

SWEEP_FILE = rundir.SWEEP
MAX_NAME = 120  # characters of a run's folder name, before its hash


def run_name(pairs: list[str]) -> str:
    """The folder name of the run with these ``key=value`` pairs: the pairs joined by '_',
    unchanged when they are plain; otherwise made safe and followed by a hash of the pairs."""
    name = "_".join(pairs)
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:MAX_NAME]
    if safe != name or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return safe


def parse_axes(overrides: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(axes [(key, [values])], fixed overrides): a value with commas, not in [ ], is an axis."""
    axes, fixed = [], []
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and "," in value and not value.strip().startswith("["):
            values = [v.strip() for v in value.split(",") if v.strip()]
            if len(set(values)) != len(values):
                raise ConfigError(f"sweep axis '{key}': values repeat ({value})")
            axes.append((key.strip(), values))
        else:
            fixed.append(text)
    if not axes:
        raise ConfigError("vaelab sweep needs at least one key=v1,v2,... to sweep over")
    return axes, fixed


def plan(
    config: str | Path | None, overrides: list[str]
) -> tuple[dict[str, Any], list[tuple[str, RunConfig]]]:
    """The sweep's description and (run name, config) for every combination, all checked."""
    axes, fixed = parse_axes(overrides)
    runs, values = [], {}
    for combo in itertools.product(*(values for _, values in axes)):
        pairs = [f"{key}={value}" for (key, _), value in zip(axes, combo, strict=True)]
        name = run_name(pairs)
        runs.append((name, load_config(config, [*fixed, *pairs])))
        values[name] = {key: value for (key, _), value in zip(axes, combo, strict=True)}
    info = {
        "config": None if config is None else str(config),
        "axes": {key: values for key, values in axes},
        "fixed": fixed,
        "runs": [name for name, _ in runs],
        "values": values,  # each run's swept values, for labels
        # What each run trains: a re-run compares these, not the path of the config file.
        "configs": {name: cfg.to_dict() for name, cfg in runs},
    }
    return info, runs


def same_sweep(before: object, now: dict[str, Any]) -> bool:
    """Whether a sweep folder's description ``before`` describes the sweep ``now``: the same
    runs with the same resolved configs (older descriptions, without configs: the same axes,
    fixed values and config path)."""
    if not isinstance(before, dict):
        return False
    if "configs" in before:
        return all(before.get(k) == now[k] for k in ("runs", "configs"))
    return all(before.get(k) == now[k] for k in ("config", "axes", "fixed", "runs", "values"))


def run_sweep(config: str | Path | None, out: str | Path, overrides: list[str]) -> list[Path]:
    """Train every run of the sweep into ``out`` (skipping finished ones); return their paths.

    ``out`` must be missing, empty, or a sweep folder with the same settings; it is locked while
    the sweep runs."""
    out = rundir.folder_arg(out)
    info, runs = plan(config, overrides)
    existing = out / SWEEP_FILE
    if out.exists() and not out.is_dir():
        raise rundir.RunDirError(f"'{out}' exists and is not a folder")
    if existing.is_file():
        if not same_sweep(_read_sweep(existing), info):
            # Same folder, other settings: resuming would keep runs trained with the old ones.
            raise ConfigError(
                f"'{out}' holds a sweep with other settings ({existing}): choose another --out"
            )
    elif out.is_dir() and any(not rundir.is_lock_file(e) for e in out.iterdir()):
        raise rundir.RunDirError(
            f"'{out}' is not empty and holds no {SWEEP_FILE}: a sweep needs an empty or missing "
            "folder, or one of its own; choose another --out"
        )
    with rundir.lock(out, what="running a sweep"):
        rundir.atomic_write(existing, json.dumps(info, indent=2) + "\n")
        splits: dict[str, data.Splits] = {}
        paths = []
        for name, cfg in runs:
            key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
            if key not in splits:  # runs that share their data share one copy of it
                splits[key] = data.build(cfg.data, progress=cfg.train.progress)
            run = out / name
            if (run / rundir.CONFIG).is_file():
                resume(run, splits=splits[key])
            else:
                train(cfg, run, splits=splits[key])
            paths.append(run)
    return paths


def _read_sweep(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"'{path}': not a readable sweep description ({err})") from None
