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
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from vaelab import models, nets, rundir
from vaelab.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    from_dict,
    load_config,
    saved_config,
    to_dict,
)
from vaelab.models.base import GenerativeModel
from vaelab.rundir import atomic_write

FORMAT = "vaelab-model/1"
STATE_FILE = Path(rundir.STATE)
log = logging.getLogger("vaelab")


class CheckpointError(RuntimeError):
    """A run directory or checkpoint file that cannot be read (message names the file)."""


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run's resolved config (its config.yaml), with ``overrides``. Settings that a newer
    vaelab refuses as ignored by the model do not stop an older run from being read."""
    path = Path(run_dir) / rundir.MODEL_CONFIG
    try:  # a model or net of a plugin: say which file it needs before the config refuses it
        info = read_json(path)
    except CheckpointError:
        info = None  # missing or unreadable: whatever reads it next says so
    if isinstance(info, dict):
        check_plugins(path, info)
    with saved_config():
        return load_config(Path(run_dir) / rundir.CONFIG, overrides)


def read_json(path: Path) -> Any:
    """A JSON file of a run; a CheckpointError naming it if it is missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"'{path}' not found: is '{path.parent}' a vaelab run directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"'{path}': not UTF-8 text, expected JSON") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{path}': not valid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"'{path}': not valid JSON (nested too deeply)") from None
    except OSError as err:
        raise CheckpointError(f"'{path}': cannot read it ({err.strerror or err})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"'{path}' not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"'{path}': not a readable safetensors file ({err})") from None
    return tensors, metadata


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, read from its header (no tensor data)."""
    if not path.is_file():
        raise CheckpointError(f"'{path}' not found")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"'{path}': not a readable safetensors file ({err})") from None


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinite values (naming the first such tensor)."""
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = int(torch.isnan(t).sum())
                inf = int((~finite).sum()) - nan
                raise CheckpointError(
                    f"'{path}': tensor '{name}' holds {nan} NaN and {inf} infinite values "
                    f"(of {t.numel()}): expected finite weights"
                )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_model_config(run_dir: str | Path, model: GenerativeModel, meta: dict[str, Any]) -> None:
    """Write ``config.json``: what ``load`` needs to rebuild the model (written once per run),
    and for a model or a net of a plugin, the plugin's file name and digest (``plugins``)."""
    info = {"format": FORMAT, "model": to_dict(model.cfg), "shape": list(model.shape), **meta}
    records = [models.plugin_record(model.cfg.name), nets.plugin_record(model.cfg.net)]
    plugins = [record for record in records if record is not None]
    if plugins:
        info["plugins"] = plugins
    atomic_write(Path(run_dir) / rundir.MODEL_CONFIG, json.dumps(info, indent=2) + "\n")


def save_weights(run_dir: str | Path, model: GenerativeModel, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors``, with ``meta`` (epoch, step) as JSON in its metadata."""
    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write(Path(run_dir) / rundir.WEIGHTS, st_save(_state_dict(model), metadata))


def weights_metadata(run_dir: str | Path) -> dict[str, Any]:
    """The metadata saved with a run's weights, e.g. {'format': ..., 'epoch': 3, 'step': 105}."""
    path = Path(run_dir) / rundir.WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"'{path}' not found")
    try:  # the header only: no tensor is read
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"'{path}': not a readable safetensors file ({err})") from None
    try:
        return {k: v if k == "format" else json.loads(v) for k, v in metadata.items()}
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"'{path}': its metadata is not valid JSON") from None


def model_info(run_dir: str | Path) -> tuple[ModelConfig, tuple[int, int, int]]:
    """The model config and image shape (C, H, W) in a run's ``config.json``, checked: a
    CheckpointError naming the file and the entry for anything else."""
    path = Path(run_dir) / rundir.MODEL_CONFIG
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"'{path}': expected format '{FORMAT}'")
    for key in ("model", "shape"):
        if key not in info:
            raise CheckpointError(f"'{path}': no '{key}' entry")
    if not isinstance(info["model"], dict):
        raise CheckpointError(
            f"'{path}': 'model' expected a mapping of model keys, got {_short(info['model'])}"
        )
    shape = info["shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
        and shape[0] in (1, 3)
    ):
        raise CheckpointError(
            f"'{path}': 'shape' expected [channels, height, width], 3 positive integers with "
            f"channels 1 or 3, got {_short(shape)}"
        )
    check_plugins(path, info)
    try:
        with saved_config():
            model_cfg = from_dict({"model": dict(info["model"])}).model
    except ConfigError as err:
        raise CheckpointError(f"'{path}': {err}") from None
    return model_cfg, (shape[0], shape[1], shape[2])


def check_plugins(path: Path, info: dict[str, Any]) -> None:
    """A run (``info``: its ``config.json`` at ``path``) whose model or net came from a plugin: a
    CheckpointError naming the file to pass with --plugin when it is not registered; a warning
    (the weights are checked anyway) when the registered one's file differs from the one the run
    was trained with. vaelab never imports the file itself."""
    model, records = info.get("model"), info.get("plugins")
    if not isinstance(records, list) or not isinstance(model, dict):
        return
    for record in records:
        if not isinstance(record, dict):
            continue
        for kind, key in (("model", "name"), ("net", "net")):
            name = model.get(key)
            if kind in record and record[kind] == name and isinstance(name, str):
                _check_plugin(path, record, f"model.{key}", name, _registered(kind, name))


def _registered(kind: str, name: str) -> tuple[Path | None, str | None] | None:
    """The file and digest that the model or net ``name`` is registered from now; None when it
    is not registered."""
    if kind == "net":
        net = nets.NETS.get(name)
        return None if net is None else (net.file, net.sha256)
    if name not in models.MODELS:
        return None
    source = models.SOURCES.get(name)
    return (source.file, source.sha256) if source else (None, None)


def _check_plugin(
    path: Path,
    record: dict[str, Any],
    key: str,
    name: str,
    now: tuple[Path | None, str | None] | None,
) -> None:
    """One plugin ``record`` of a run against what ``key`` (model.name, model.net) ``name`` is
    registered from ``now`` (None: not registered)."""
    file = record.get("file")
    if now is None:
        api = "vaelab.models.register" if key == "model.name" else "vaelab.nets.register"
        if not file:
            raise CheckpointError(
                f"'{path}': {key} '{name}' was registered by code outside a file: "
                f"register it ({api}) before loading"
            )
        raise CheckpointError(
            f"'{path}': {key} '{name}' comes from the plugin {file}: pass --plugin {file} "
            "(in Python: import it before loading)"
        )
    now_file, now_digest = now
    digest = record.get("sha256")
    if digest and now_digest != digest and (path, now_digest) not in _WARNED:
        _WARNED.add((path, now_digest))
        here = now_file.name if now_file else "code outside a file"
        what = f"the plugin {file} changed" if here == file else f"{here} replaced {file}"
        log.warning(
            f"'{path}': {key} '{name}': {what} since the run was trained (sha256 "
            f"{str(digest)[:12]}... then, {(now_digest or '-')[:12]}... now): loading it anyway"
        )


_WARNED: set[tuple[Path, str | None]] = set()  # each changed plugin is told once per run


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """The trained model of a run, in eval mode, ready to ``encode``, ``decode``, ``sample``.

    Reads only JSON and safetensors: loading an untrusted run cannot execute code. Nothing is
    allocated before the files agree: the model's size is checked against the memory (on the
    meta device), and its tensors' names and shapes against the weights file's header; weights
    holding NaN or infinite values are refused.
    """
    run_dir = Path(run_dir)
    model_cfg, shape = model_info(run_dir)
    weights = run_dir / rundir.WEIGHTS
    try:
        models.check_size(model_cfg, shape, training=False, device=device)
    except ConfigError as err:
        raise CheckpointError(f"'{run_dir / 'config.json'}': {err}") from None
    if not weights.is_file():
        raise CheckpointError(f"'{weights}' not found: the run has not finished an epoch yet")
    expected = {
        k: tuple(v.shape) for k, v in models.build_meta(model_cfg, shape).state_dict().items()
    }
    _check_names_and_shapes(expected, _header(weights), weights)
    tensors, _ = _read_safetensors(weights)
    _check_finite(tensors, weights)
    model = models.build(model_cfg, shape)
    _load_into(model, tensors, weights)
    return model.to(device).eval()


def _check_names_and_shapes(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    path: Path,
    model: str = "the model of config.json",
) -> None:
    """The tensors of a file (``found``: name -> shape) against a model's (``expected``)."""
    if set(found) != set(expected):
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        raise CheckpointError(
            f"'{path}': tensors do not match {model} (missing {missing}, unexpected {extra})"
            f"{_why_missing(missing)}"
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(
                f"'{path}': tensor '{name}' has shape {list(found[name])}, {model} expects "
                f"{list(shape)}"
            )


def _why_missing(missing: list[str]) -> str:
    """A hint for the one known cause of missing tensors: a run saved before the likelihood's
    fitted state (sigma_vae's variance) was kept with the weights."""
    if missing and all(name.startswith("likelihood.") for name in missing):
        return (
            "; the run was saved before vaelab kept sigma_vae's fitted decoder variance with "
            "its weights: train it again"
        )
    return ""


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(module.state_dict())
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise CheckpointError(
            f"'{path}': tensors do not match the model (missing {missing}, unexpected {extra})"
            f"{_why_missing(missing)}"
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
    """Restore what ``save_train_state`` wrote (RNG included); return the counters.

    Everything in the file is checked before anything is restored: a file whose entries are
    missing, of the wrong type or shape, or not finite is a CheckpointError naming the file and
    the entry.
    """
    path = Path(run_dir) / STATE_FILE
    tensors, meta = _read_safetensors(path)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"'{path}': {what}")

    entries = {}
    for key in ("counters", "param_groups", "optim_scalars"):
        if key not in meta:
            raise bad(f"metadata has no '{key}' (the file is incomplete)")
        try:
            entries[key] = json.loads(meta[key])
        except (json.JSONDecodeError, RecursionError):
            raise bad(f"metadata '{key}' is not valid JSON") from None
    counters = _check_counters(entries["counters"], bad)
    _check_finite(tensors, path)
    model_tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_names_and_shapes(
        {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()},
        {f"model.{k}": tuple(v.shape) for k, v in model_tensors.items()},
        path,
        "the run's model",
    )
    state = _optimizer_state(tensors, entries["optim_scalars"], bad)
    param_groups = _check_param_groups(entries["param_groups"], optimizer, state, bad)
    rng = tensors.get("rng.torch")
    if rng is None:
        raise bad("no tensor 'rng.torch' (the random generator's state)")
    if rng.dtype != torch.uint8 or rng.dim() != 1 or rng.shape != torch.get_rng_state().shape:
        raise bad(
            f"tensor 'rng.torch' is {rng.dtype} {list(rng.shape)}, expected torch.uint8 "
            f"{list(torch.get_rng_state().shape)}"
        )
    cuda_state = tensors.get("rng.cuda", tensors.get("rng.cuda.0"))  # rng.cuda.0: older runs
    if cuda_state is not None and (cuda_state.dtype != torch.uint8 or cuda_state.dim() != 1):
        raise bad(f"tensor 'rng.cuda' is {cuda_state.dtype} {list(cuda_state.shape)}")

    _load_into(model, model_tensors, path)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError, TypeError) as err:
        raise bad(f"optimizer state does not match ({err})") from None
    # Saved tensors are contiguous; a parameter may be channels-last. Give each moment its
    # parameter's memory layout: fused and foreach optimizer kernels walk them in memory order.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    optimizer.state[p][name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    try:
        torch.set_rng_state(rng)
        if cuda_state is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_state)  # the current device's generator
    except (RuntimeError, ValueError, TypeError) as err:
        raise bad(f"the random generator's state cannot be restored ({err})") from None
    return counters


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# What a GradScaler's state_dict holds (an fp16 run saves it with the counters).
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _check_counters(counters: Any, bad: Any) -> dict[str, Any]:
    if not isinstance(counters, dict):
        raise bad(f"metadata 'counters' expected a mapping, got {_short(counters)}")
    for key in ("epoch", "step"):
        if not _is_int(counters.get(key)) or counters[key] < 0:
            raise bad(f"counter '{key}' expected an integer >= 0, got {_short(counters.get(key))}")
    if "seconds" in counters and not (_is_number(counters["seconds"]) and counters["seconds"] >= 0):
        raise bad(f"counter 'seconds' expected a number >= 0, got {_short(counters['seconds'])}")
    scaler = counters.get("grad_scaler")
    if scaler is not None and not (
        isinstance(scaler, dict)
        and all(_is_number(scaler.get(k)) for k in _SCALER_KEYS)
        and scaler["scale"] > 0
    ):
        raise bad(
            f"counter 'grad_scaler' expected a mapping of {', '.join(_SCALER_KEYS)}, "
            f"got {_short(scaler)}"
        )
    return counters


def _optimizer_state(
    tensors: dict[str, torch.Tensor], scalars: Any, bad: Any
) -> dict[int, dict[str, Any]]:
    """Per-parameter optimizer state from the tensors optim.<index>.<name> and the scalars."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = [*key.split(".", 2), "", ""][:3]
            if not idx.isdigit() or not name:
                raise bad(f"tensor '{key}': expected optim.<parameter index>.<name>")
            state.setdefault(int(idx), {})[name] = value
    if not isinstance(scalars, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, dict) for k, v in scalars.items()
    ):
        raise bad(
            f"metadata 'optim_scalars' expected {{index: {{name: value}}}}, got {_short(scalars)}"
        )
    for idx, entry in scalars.items():
        state.setdefault(int(idx), {}).update(entry)
    return state


def _check_param_groups(
    groups: Any, optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Any]], bad: Any
) -> list[dict[str, Any]]:
    """The saved parameter groups against the optimizer's: as many groups, each with as many
    parameters and settings of the same kinds; every state entry belongs to a parameter and
    has its shape. Returned with the optimizer's settings that a saved group lacks (one added
    since the run was saved, such as the trainer's "base_lr"), which keep their value."""
    current = optimizer.param_groups
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad(f"metadata 'param_groups' expected a list of mappings, got {_short(groups)}")
    if len(groups) != len(current):
        raise bad(f"metadata 'param_groups' has {len(groups)} groups, the optimizer {len(current)}")
    params: dict[int, torch.Tensor] = {}
    for n, (saved, now) in enumerate(zip(groups, current, strict=True)):
        ids = saved.get("params")
        if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
            raise bad(f"param_groups[{n}]['params'] expected a list of integers, got {_short(ids)}")
        if len(ids) != len(now["params"]):
            raise bad(
                f"param_groups[{n}] has {len(ids)} parameters, the model {len(now['params'])}"
            )
        params.update(zip(ids, now["params"], strict=True))
        for key, value in saved.items():
            if key == "params" or key not in now:
                continue
            expect = now[key]
            if isinstance(expect, bool) or expect is None:
                ok = value is None or isinstance(value, bool)
            elif isinstance(expect, int | float):
                ok = _is_number(value) and value >= 0
            elif isinstance(expect, tuple | list):
                ok = (
                    isinstance(value, list)
                    and len(value) == len(expect)
                    and all(_is_number(v) for v in value)
                )
            else:
                ok = True
            if not ok:
                raise bad(
                    f"param_groups[{n}]['{key}'] expected a value like {expect!r}, "
                    f"got {_short(value)}"
                )
    for idx, entry in state.items():
        if idx not in params:
            raise bad(f"optimizer state for parameter {idx}, which no param_groups entry lists")
        shape = params[idx].shape
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
                raise bad(
                    f"tensor 'optim.{idx}.{name}' has shape {list(value.shape)}, its parameter "
                    f"{list(shape)}"
                )
    return [{**now, **saved} for saved, now in zip(groups, current, strict=True)]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (empty if it has none yet)."""
    path = Path(run_dir) / rundir.METRICS
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{path}': cannot read it as UTF-8 text ({err})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise CheckpointError(f"'{path}' line {n}: not valid JSON") from None
            if not (
                isinstance(row, dict)
                and isinstance(row.get("split"), str)
                and _is_int(row.get("epoch"))
            ):
                raise CheckpointError(
                    f"'{path}' line {n}: expected a mapping with 'split' and an integer 'epoch'"
                )
            rows.append(row)
    return rows
