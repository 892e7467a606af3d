"""Checkpoints without pickle: JSON for structure, safetensors for tensors.

A run directory holds the model for ``load`` (``config.json`` + ``model.safetensors``) and, for
resume, ``state/train_state.safetensors``: the model, optimizer and RNG tensors in one file, with
the counters and optimizer settings as JSON in its metadata. One file means one atomic rename, so
a resume can never pair weights of one epoch with an optimizer of another.

Every file is written with ``rundir.atomic_write`` (a temporary name in the same folder, then a
rename), so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from vaelab import models
from vaelab.config import ConfigError, from_dict, to_dict
from vaelab.models.base import GenerativeModel
from vaelab.rundir import atomic_write

FORMAT = "vaelab-model/1"
STATE_FILE = Path("state") / "train_state.safetensors"


class CheckpointError(RuntimeError):
    """A run directory or checkpoint file that cannot be read (message names the file)."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"'{path}' not found: is '{path.parent}' a vaelab run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{path}': not valid JSON ({err})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"'{path}' not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"'{path}': not a readable safetensors file ({err})") from None
    return tensors, metadata


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_model_config(run_dir: str | Path, model: GenerativeModel, meta: dict[str, Any]) -> None:
    """Write ``config.json``: what ``load`` needs to rebuild the model (written once per run)."""
    info = {"format": FORMAT, "model": to_dict(model.cfg), "shape": list(model.shape), **meta}
    atomic_write(Path(run_dir) / "config.json", json.dumps(info, indent=2) + "\n")


def save_weights(run_dir: str | Path, model: GenerativeModel, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors``, with ``meta`` (epoch, step) as JSON in its metadata."""
    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write(Path(run_dir) / "model.safetensors", st_save(_state_dict(model), metadata))


def weights_metadata(run_dir: str | Path) -> dict[str, Any]:
    """The metadata saved with a run's weights, e.g. {'format': ..., 'epoch': 3, 'step': 105}."""
    path = Path(run_dir) / "model.safetensors"
    _, metadata = _read_safetensors(path)
    return {k: v if k == "format" else json.loads(v) for k, v in metadata.items()}


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """The trained model of a run, in eval mode, ready to ``encode``, ``decode``, ``sample``.

    Reads only JSON and safetensors: loading an untrusted run cannot execute code.
    """
    run_dir = Path(run_dir)
    info = _read_json(run_dir / "config.json")
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"'{run_dir / 'config.json'}': expected format '{FORMAT}'")
    try:
        model_cfg = from_dict({"model": info["model"]}).model
        shape = tuple(int(s) for s in info["shape"])
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"'{run_dir / 'config.json'}': {err}") from None
    model = models.build(model_cfg, shape)  # type: ignore[arg-type]
    if not (run_dir / "model.safetensors").is_file():
        raise CheckpointError(
            f"'{run_dir / 'model.safetensors'}' not found: the run has not finished an epoch yet"
        )
    tensors, _ = _read_safetensors(run_dir / "model.safetensors")
    _load_into(model, tensors, run_dir / "model.safetensors")
    return model.to(device).eval()


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(module.state_dict())
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise CheckpointError(
            f"'{path}': tensors do not match the model (missing {missing}, unexpected {extra})"
        )
    try:
        module.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"'{path}': {first}") from None


# -- training state, for resume ------------------------------------------------------------


def save_train_state(
    run_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    counters: dict[str, Any],
) -> None:
    """Model, optimizer, RNG and counters in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v for k, v in _state_dict(model).items()}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The generator of the device this process trains on (under torchrun every rank's is
        # in the same state), so a run resumes on any GPU, or any number of them.
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "format": FORMAT,
        "counters": json.dumps(counters),
        "param_groups": json.dumps(opt["param_groups"]),
        "optim_scalars": json.dumps(opt_scalars),
    }
    atomic_write(Path(run_dir) / STATE_FILE, st_save(tensors, meta))


def load_train_state(
    run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore what ``save_train_state`` wrote (RNG included); return the counters."""
    path = Path(run_dir) / STATE_FILE
    tensors, meta = _read_safetensors(path)
    try:
        counters = json.loads(meta["counters"])
        param_groups = json.loads(meta["param_groups"])
        opt_scalars = json.loads(meta["optim_scalars"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{path}': metadata is incomplete ({err})") from None
    _load_into(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in opt_scalars.items():
        state.setdefault(int(idx), {}).update(entry)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"'{path}': optimizer state does not match ({err})") from None
    # Saved tensors are contiguous; a parameter may be channels-last. Give each moment its
    # parameter's memory layout: fused and foreach optimizer kernels walk them in memory order.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_state = tensors.get("rng.cuda", tensors.get("rng.cuda.0"))  # rng.cuda.0: older runs
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)  # the current device's generator
    return counters


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (empty if it has none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CheckpointError(f"'{path}' line {n}: not valid JSON") from None
    return rows
