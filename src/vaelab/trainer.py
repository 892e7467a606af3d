"""The trainer: any registered model, checkpoints every epoch, exact resume.

The module is ``vaelab.trainer``; ``vaelab.train`` and ``vaelab.resume`` are its two entry
points. Read top to bottom: ``train`` starts a run and ``resume`` continues one; ``setup`` makes
what a run trains with (device, data, model, optimizer, the speed options of ``vaelab.speed``);
``fit`` runs epochs of (shuffle, ``train_step`` for each batch, validate, save). The loop reads
only the model's ``ModelOutput`` (its loss and named terms), so it never changes when a variant
is added; the model reads the step from a ``StepContext``.

Reproducibility: the shuffle of epoch e depends only on (train.seed, e), and the model's noise
comes from torch's global generator, whose state is saved with every checkpoint. Validation runs
the evaluation pass of ``vaelab.metrics`` under its own fixed seed, so it neither consumes
training randomness nor wobbles between epochs, and it gives the numbers ``vaelab evaluate``
gives. A resumed run therefore ends with bit-for-bit the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from vaelab import (
    conditions,
    data,
    distributed,
    metrics,
    models,
    nets,
    progress,
    rng,
    rundir,
    speed,
)
from vaelab.checkpoint import (
    CheckpointError,
    atomic_write,
    load_train_state,
    read_json,
    read_metrics,
    run_config,
    save_model_config,
    save_train_state,
    save_weights,
    weights_metadata,
)
from vaelab.config import ConfigError, RunConfig, TrainConfig, dump_yaml, to_dict
from vaelab.data import DataError, ImageDataset, Splits
from vaelab.data.base import DeviceImages, batch_source, log
from vaelab.distributed import World
from vaelab.models.base import GenerativeModel, ModelOutput, StepContext
from vaelab.rng import noise_shard, seeded

EpochCallback = Callable[[int, list[dict[str, Any]]], None]
FINGERPRINT_CHUNK = 8192  # images hashed at a time by data_fingerprint
# Keys that may change when a run is continued: how it runs, not what it learns. The data's
# location may change too: its pixels are checked against the run's fingerprint.
RESUMABLE_KEYS = (
    "data.root",
    "data.cache_dir",
    "data.workers",
    "train.epochs",
    "train.precision",
    "train.allow_emulated",
    "train.channels_last",
    "train.compile",
    "train.fused_adam",
    "train.log_every",
    "train.cpu_memory_cache",
    "train.fast_layers",
    "train.progress",
    "train.device",
    "train.threads",
    "train.tensorboard",
)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the message says where."""


class _Interrupt:
    """Ctrl-C stops training even when its KeyboardInterrupt is raised inside a finalizer,
    where Python prints "Exception ignored" and carries on: while training, the SIGINT handler
    also remembers the signal, and the loop checks after every step (``check``). Only Python's
    default handler is replaced (not a notebook's), only in the main thread, and put back."""

    def __init__(self) -> None:
        self.seen = False
        self.previous: Any = None

    def __enter__(self) -> _Interrupt:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


@dataclass
class Session:
    """What a run trains with, all made before anything is written (``setup``)."""

    cfg: RunConfig
    splits: Splits
    device: torch.device
    world: World
    model: GenerativeModel  # the model itself: what is saved and evaluated
    forward: speed.Forward  # the model (or its DDP wrapper) as the speed options run it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    board: _Board
    picked: str = ""  # why train.precision=auto picked what it did ("" when it was not auto)
    interrupt: _Interrupt = field(default_factory=_Interrupt)

    def context(self, step: int, epoch: int) -> StepContext:
        """The step context the model's forward pass reads."""
        return StepContext(
            step,
            epoch,
            self.cfg.train.kl_warmup_steps,
            self.world.size,
            dataset_size=len(self.splits.train),
        )


def setup(cfg: RunConfig, splits: Splits | None = None) -> Session:
    """Device, process group, data, model and optimizer: everything that can fail on bad input.
    The process-wide settings of ``speed.process_settings`` are the caller's (``train`` and
    ``resume`` hold them while they train)."""
    tc = cfg.train
    world = distributed.from_environment()
    device = _device(tc.device, world)
    if tc.batch_size % world.size:
        raise ConfigError(
            f"config key 'train.batch_size': the global batch is split over {world.size} "
            f"processes, expected a multiple of {world.size}, got {tc.batch_size}"
        )
    precision, why = speed.resolve_precision(tc, device)
    picked = why if tc.precision == "auto" else ""
    if world.is_main and picked:
        log.info(f"train.precision=auto picked {precision}: {why}")
    elif world.is_main and why:  # an emulated precision, run anyway
        log.warning(why)
    if precision != tc.precision:  # auto, resolved: what config.yaml records and resume reads
        cfg = replace(cfg, train=replace(tc, precision=precision))
        tc = cfg.train
    board = _Board(tc.tensorboard and world.is_main)
    models.MODELS[cfg.model.name].check_run(cfg, world.size)
    distributed.init(world, device)
    if splits is None:
        # Rank 0 first: it fills the preprocessing cache (shared file system). Then the first
        # rank of every other machine (a cache of its own), then the rest, who only read it.
        if world.is_main:
            splits = data.build(cfg.data, progress=tc.progress)
        distributed.barrier(world)
        if not world.is_main and world.local_rank == 0:
            splits = data.build(cfg.data, progress=False)
        distributed.barrier(world)
        if splits is None:
            splits = data.build(cfg.data, progress=False)
    if world.distributed and len(splits.train) < tc.batch_size:
        raise ConfigError(
            f"config key 'train.batch_size': {tc.batch_size} is more than the "
            f"{len(splits.train)} training images; lower it (torchrun needs full batches)"
        )
    # What the model reads from the data (cvae: its condition's variables), recorded in the
    # run's config so the model is built without the data.
    completed = models.MODELS[cfg.model.name].complete_config(cfg.model, splits.train)
    if completed != cfg.model:
        cfg = replace(cfg, model=completed)
    torch.manual_seed(tc.seed)  # the same on every rank: same weights, same noise
    # Refused before anything is allocated: a model larger than the memory it would train in.
    width = 8 if tc.precision == "fp64" else 4
    models.check_size(cfg.model, splits.train.shape, True, device, bytes_per_value=width)
    model = models.build(cfg.model, splits.train.shape).to(device)
    if tc.precision == "fp64":
        model = model.double()
    model = speed.prepare(model, tc, device)
    module: Any = model
    if world.distributed:
        distributed.sync_batchnorm(model, device)
        module = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(_groups(model, tc), lr=tc.lr, fused=tc.fused_adam or None)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    forward = speed.Forward(module, tc, device, world.distributed)
    return Session(cfg, splits, device, world, model, forward, optimizer, scaler, board, picked)


def _groups(model: GenerativeModel, tc: TrainConfig) -> list[dict[str, Any]]:
    """The model's Adam parameter groups (``GenerativeModel.param_groups``), each keeping its
    own base rate as "base_lr" for the schedule (``learning_rate``). A parameter left out or
    listed twice is a ValueError naming the model: it would not train, or train twice."""
    groups = [{**g, "base_lr": g.get("lr", tc.lr)} for g in model.param_groups(tc)]
    listed = [id(p) for g in groups for p in g["params"]]
    if sorted(listed) != sorted(id(p) for p in model.parameters()):
        raise ValueError(
            f"model '{model.cfg.name}': param_groups() must list every parameter exactly once"
        )
    return groups


def train(
    cfg: RunConfig,
    out: str | Path,
    *,
    splits: Splits | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train a new run into ``out`` (a missing or empty folder); return its path.

    Bad input (a device that is not there, data that cannot be read, a folder that holds
    anything) fails before anything is written. A run that fails before its first epoch has
    finished is removed again: it held nothing but its config, and the same command can be
    retried. Under torchrun every process calls this; only rank 0 writes.
    """
    run = rundir.check_new_run(out)
    with rng.kept(), speed.process_settings(cfg.train):
        return _train_new(run, cfg, splits, on_epoch_end)


def _train_new(
    run: Path, cfg: RunConfig, splits: Splits | None, on_epoch_end: EpochCallback | None
) -> Path:
    session = setup(cfg, splits)
    cfg = session.cfg  # train.precision=auto resolved
    recorded = _recording(cfg, session.splits) if session.world.is_main else {}
    distributed.barrier(session.world)  # every rank has checked `out` before rank 0 writes it
    lock = None
    if session.world.is_main:
        created = [p for p in (run, *run.parents) if not p.exists()]  # deepest first
        lock = rundir.lock(run, what="training")
        try:
            rundir.check_new_run(run)  # again, under the lock: another process may have begun
        except BaseException:
            lock.release()
            raise
        try:
            save_model_config(run, session.model, recorded)
            atomic_write(run / rundir.CONFIG, _config_text(session))  # last: marks a run
        except BaseException:
            _remove_unfinished(run, created, lock)
            raise
    try:
        return fit(run, session, {"epoch": 0, "step": 0, "seconds": 0.0}, [], on_epoch_end)
    except BaseException:
        if lock is not None and not rundir.has_checkpoint(run):
            _remove_unfinished(run, created, lock)
        raise
    finally:
        if lock is not None:
            lock.release()


def _remove_unfinished(run: Path, created: list[Path], lock: rundir.Lock) -> None:
    """Remove what a new run wrote before its first checkpoint (only vaelab's own names), and
    the folders this process created (``created``, deepest first) if they are left empty. The
    lock file goes while the lock is still held, so no other process can hold a lock on it."""
    for name in (rundir.CONFIG, rundir.MODEL_CONFIG, rundir.METRICS, rundir.WEIGHTS):
        (run / name).unlink(missing_ok=True)
    rundir.remove_stale_temporaries(run)
    if (run / rundir.TENSORBOARD).is_dir():
        shutil.rmtree(run / rundir.TENSORBOARD, ignore_errors=True)
    for folder in (Path(rundir.STATE).parent, rundir.EVAL, rundir.FIGURES):
        with contextlib.suppress(OSError):
            (run / folder).rmdir()  # only if empty
    if created:
        (run / rundir.LOCK).unlink(missing_ok=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
    lock.release()


def resume(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    splits: Splits | None = None,
    on_epoch_end: EpochCallback | None = None,
    accept_changes: bool = False,
) -> Path:
    """Continue an interrupted run from its last checkpoint, or extend it (train.epochs=N).

    An interrupted run resumed as it was ends with exactly the weights of an uninterrupted one,
    on the same number of processes or another (up to summation order across processes).
    Extending a run with train.lr_schedule=cosine stretches the rest of its schedule to the new
    length, so it ends elsewhere than a run planned that long from the start.

    Refused (one line): a run that is being trained by another process; a run with weights but
    no resume state; keys that cannot change (only RESUMABLE_KEYS may, unless no epoch has
    finished yet: then nothing was trained and any key may change); hand edits of such keys in
    config.yaml, and data that changed since the run began, unless ``accept_changes`` (then
    each change is logged).
    """
    run = rundir.folder_arg(run_dir, "--resume")
    if not (run / rundir.CONFIG).is_file():
        raise CheckpointError(f"'{run / rundir.CONFIG}' not found: is '{run}' a vaelab run?")
    world = distributed.from_environment()
    lock = rundir.lock(run, what="training") if world.is_main else None
    try:
        with rng.kept(), contextlib.ExitStack() as settings:
            counters, rows, session = _reopen(
                run, overrides or [], splits, accept_changes, settings
            )
            if world.is_main:
                rundir.remove_stale_temporaries(run)
                if overrides:
                    atomic_write(run / rundir.CONFIG, _config_text(session))
            return fit(run, session, counters, rows, on_epoch_end)
    finally:
        if lock is not None:
            lock.release()


def _reopen(
    run: Path,
    overrides: list[str],
    splits: Splits | None,
    accept_changes: bool,
    settings: contextlib.ExitStack,
) -> tuple[dict[str, Any], list[dict[str, Any]], Session]:
    """What ``resume`` continues from: the counters, metrics rows and session (its config
    resolved), each checked against what the run recorded when it began."""
    state = run / rundir.STATE
    started = rundir.has_checkpoint(run)
    if started and not state.is_file():
        epoch = weights_metadata(run).get("epoch", "?")
        raise CheckpointError(
            f"'{state}' is missing, but '{run}' holds the weights of epoch {epoch}: without it "
            "the run cannot continue exactly (use the weights as they are, or train a new run)"
        )
    if started:
        for text in overrides:
            key = text.partition("=")[0].strip()
            if key not in RESUMABLE_KEYS:
                raise ConfigError(
                    f"config key '{key}' cannot change when resuming (allowed: "
                    f"{', '.join(RESUMABLE_KEYS)})"
                )
    cfg = run_config(run, overrides)
    recorded = _recorded(run)
    if started:
        _check_unchanged(run, cfg, recorded, accept_changes)
    settings.enter_context(speed.process_settings(cfg.train))
    session = setup(cfg, splits)
    cfg = session.cfg  # train.precision=auto resolved
    if started:
        _check_same_data(run, session.splits, recorded, accept_changes)
        if accept_changes and session.world.is_main:
            # What was accepted is what the run is now: the next resume compares with it.
            save_model_config(run, session.model, _recording(cfg, session.splits))
    counters: dict[str, Any] = {"epoch": 0, "step": 0, "seconds": 0.0}
    rows: list[dict[str, Any]] = []
    if started:
        counters = load_train_state(run, session.model, session.optimizer)
        scaler_state = counters.pop("grad_scaler", None)
        if scaler_state is not None:  # an fp16 run; a run switched to fp16 starts a fresh scale
            session.scaler.load_state_dict(scaler_state)
        # Rows logged after the checkpoint (a crash between the two writes) are dropped.
        rows = [r for r in read_metrics(run) if r["epoch"] <= counters["epoch"]]
    elif session.world.is_main:
        # Nothing trained yet: the run starts over with this config (train.lr=..., say).
        save_model_config(run, session.model, _recording(cfg, session.splits))
    if cfg.train.epochs < counters["epoch"]:
        raise ConfigError(
            f"config key 'train.epochs': '{run}' has finished {counters['epoch']} epochs, "
            f"expected at least that many, got {cfg.train.epochs}"
        )
    distributed.barrier(session.world)  # every rank has read the run before rank 0 writes
    return counters, rows, session


def _config_text(session: Session) -> str:
    """config.yaml: the session's resolved config, saying why where train.precision=auto
    picked, and which plugin file a model or net of a plugin comes from (config.json records
    it too)."""
    comments = {"train.precision": f"auto picked it: {session.picked}"} if session.picked else {}
    model = session.cfg.model
    for key, plugin in (
        ("model.name", models.plugin_record(model.name)),
        ("model.net", nets.plugin_record(model.net)),
    ):
        if plugin is not None and plugin["file"]:
            file, digest = plugin["file"], plugin.get("sha256", "-")
            comments[key] = f"from the plugin {file} (sha256 {digest}): pass --plugin {file}"
        elif plugin is not None:
            comments[key] = "registered outside a file: register it again before loading"
    return dump_yaml(session.cfg, comments)


def _recording(cfg: RunConfig, splits: Splits) -> dict[str, Any]:
    """What config.json records when a run begins, besides the model: the data and train
    sections and the data's fingerprint, which resume checks."""
    return {
        "data": to_dict(cfg.data),
        "train": to_dict(cfg.train),
        "fingerprint": data_fingerprint(splits),
    }


def _recorded(run: Path) -> dict[str, Any]:
    """What config.json recorded when the run began (older runs: model and data only)."""
    info = read_json(run / rundir.MODEL_CONFIG)
    if not isinstance(info, dict):
        raise CheckpointError(f"'{run / rundir.MODEL_CONFIG}': expected a JSON object")
    return info


def _check_unchanged(
    run: Path, cfg: RunConfig, recorded: dict[str, Any], accept_changes: bool
) -> None:
    """Refuse hand edits of config.yaml to keys that the command line may not change."""
    now = cfg.to_dict()
    changes = []
    for section in ("data", "model", "train"):
        before = recorded.get(section)
        if not isinstance(before, dict):
            continue
        for key, value in before.items():
            dotted = f"{section}.{key}"
            if dotted in RESUMABLE_KEYS:
                continue
            if key in now[section] and now[section][key] != value:
                changes.append(f"{dotted} {value!r} -> {now[section][key]!r}")
    if not changes:
        return
    if not accept_changes:
        raise ConfigError(
            f"'{run / rundir.CONFIG}' was edited since the run began ({'; '.join(changes)}): "
            "put it back, or pass --accept-changes to continue with the edits"
        )
    for change in changes:
        log.warning(f"{run}: continuing with an edited config.yaml: {change}")


def _check_same_data(
    run: Path, splits: Splits, recorded: dict[str, Any], accept_changes: bool
) -> None:
    """Refuse to continue a run on other data than it began with."""
    before = recorded.get("fingerprint")
    if not isinstance(before, dict):
        return  # a run from before fingerprints were recorded
    now = data_fingerprint(splits)
    if now == before:
        return
    what = (
        f"{before.get('train')} train / {before.get('val')} val images, now "
        f"{now['train']} / {now['val']}"
        if (before.get("train"), before.get("val")) != (now["train"], now["val"])
        else "same counts, other pixels"
    )
    if not accept_changes:
        raise DataError(
            f"the data of '{run}' changed since the run began ({what}): resuming would train "
            "on other data; restore it, or pass --accept-changes to continue on the new data"
        )
    log.warning(f"{run}: continuing on changed data ({what})")


def data_fingerprint(splits: Splits) -> dict[str, Any]:
    """The train and val images' counts and a digest of their pixels, recorded when a run
    begins so that a resume on other data is noticed (a few seconds for CelebA)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (splits.train, splits.val):
        digest.update(repr((len(part), part.shape)).encode())
        for i in range(0, len(part), FINGERPRINT_CHUNK):
            digest.update(np.ascontiguousarray(part.uint8(slice(i, i + FINGERPRINT_CHUNK))).data)
    return {"train": len(splits.train), "val": len(splits.val), "digest": digest.hexdigest()}


def _device(name: str, world: World) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': cuda was asked for but none is available")
    if name == "cuda":
        device = torch.device("cuda", world.local_rank if world.distributed else 0)
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def fit(
    run: Path,
    session: Session,
    counters: dict[str, Any],
    rows: list[dict[str, Any]],
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train ``session`` from ``counters`` (epoch, step, seconds) to train.epochs, writing a
    checkpoint into ``run`` after every epoch (rank 0). ``rows``: the metrics so far."""
    cfg, world, tc = session.cfg, session.world, session.cfg.train
    if counters["epoch"] >= tc.epochs:
        if world.is_main:
            print(f"{run}: already trained for {counters['epoch']} of {tc.epochs} epochs")
        return run
    if world.is_main:
        log.info(f"{cfg.model.name}: {', '.join(speed.applied(tc, session.device))}")
        session.board.open(run, counters["step"])
    try:
        with session.interrupt:
            _epochs(run, session, counters, rows, on_epoch_end)
    finally:
        session.board.close()
    distributed.barrier(world)  # no rank leaves before rank 0 has written the last epoch
    return run


def _epochs(
    run: Path,
    session: Session,
    counters: dict[str, Any],
    rows: list[dict[str, Any]],
    on_epoch_end: EpochCallback | None,
) -> None:
    """Epochs from counters["epoch"] + 1 to train.epochs, each checkpointed (rank 0)."""
    cfg, world, tc = session.cfg, session.world, session.cfg.train
    for epoch in range(counters["epoch"] + 1, tc.epochs + 1):
        start = time.perf_counter()
        train_row = _train_epoch(run, session, epoch, counters)
        counters["seconds"] += time.perf_counter() - start
        start = time.perf_counter()
        val_row = validate(session, epoch, counters["step"])
        counters["seconds"] += time.perf_counter() - start
        if not math.isfinite(val_row["loss"]):  # finite weights, too large a forward pass
            raise _diverged(
                f"the validation loss became {val_row['loss']} after epoch {epoch}", run, epoch - 1
            )
        counters["epoch"] = epoch
        rows += [_row("train", counters, train_row), _row("val", counters, val_row)]
        if world.is_main:
            _save(run, session, counters, rows)
            if tc.progress:
                print(_epoch_line(cfg.model.name, epoch, tc.epochs, rows[-2:]), flush=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch, rows[-2:])
        session.interrupt.check()


def _train_epoch(
    run: Path, session: Session, epoch: int, counters: dict[str, Any]
) -> dict[str, Any]:
    """One epoch of steps over a fresh shuffle; the per-image means of the terms (all ranks)."""
    cfg, world, device, tc = session.cfg, session.world, session.device, session.cfg.train
    train_set = session.splits.train
    # The global batch; every rank computes rows rank::world of it (batch_size divides evenly,
    # and under torchrun there are at least batch_size images: see setup). The last partial
    # batch is dropped: every step sees the same batch size (batch-norm statistics from a
    # handful of images are noise), and every image is seen within two epochs.
    batch_size = min(tc.batch_size, len(train_set))
    steps = len(train_set) // batch_size
    order = np.random.default_rng([tc.seed, epoch]).permutation(len(train_set))
    order = order[: steps * batch_size].reshape(steps, batch_size)
    rows = order[:, world.rank :: world.size].copy()  # this rank's positions, on the CPU
    mine = torch.from_numpy(rows)
    source = batch_source(train_set, device)
    if isinstance(source, DeviceImages):
        mine = mine.to(device)
    dtype = torch.float64 if tc.precision == "fp64" else torch.float32
    session.model.train()
    sums = metrics.Sums()
    show = tc.progress and world.is_main
    bar = progress.bar(steps, f"{cfg.model.name} epoch {epoch}/{tc.epochs}", show,
                       leave=False, dynamic_ncols=True)  # fmt: skip
    seen, window_start = torch.zeros((), device=device, dtype=torch.float64), 0
    for i in range(steps):
        x = source.batch(mine[i], device).to(dtype)
        given = conditions.given(session.model, train_set, rows[i])  # on the CPU: no sync
        with noise_shard(world.rank, world.size, batch_size), given:
            if cfg.data.flip:
                x = data.random_hflip(x)
            ctx = session.context(counters["step"], epoch)
            out = train_step(session, speed.inputs(x, tc), ctx, tc.epochs * steps)
        counters["step"] += 1
        sums.add(metrics.output_terms(out, session.model), out.loss.shape[0])
        bar.update(1)
        session.interrupt.check()
        if (i + 1) % tc.log_every == 0 or i + 1 == steps:
            # The only host-device synchronisation of the loop: every log_every steps.
            total = sums.total("loss")
            n = (i + 1 - window_start) * batch_size
            value = distributed.all_sum(total - seen, world).item() / n
            if not math.isfinite(value):
                bar.close()
                first = counters["step"] - (i - window_start)
                where = (
                    f"step {first}"
                    if first == counters["step"]
                    else f"between steps {first} and {counters['step']}"
                )
                raise _diverged(f"loss became {value} at epoch {epoch}, {where}", run, epoch - 1)
            bar.set_postfix(loss=f"{value:.2f}", refresh=False)
            seen, window_start = total, i + 1
    bar.close()
    # A finite loss can still come with non-finite gradients; such weights are never saved.
    if not _all_finite(session.model):
        raise _diverged(
            f"the weights became non-finite in epoch {epoch} (by step {counters['step']})",
            run,
            epoch - 1,
        )
    return metrics.finish(sums.means(world), session.model)


def train_step(
    session: Session, x: torch.Tensor, ctx: StepContext, total_steps: int
) -> ModelOutput:
    """One optimizer step on batch ``x``: forward, the mean loss backward (scaled for fp16),
    Adam. No host-device synchronisation. With train.compile the first step compiles
    (``speed.Forward.guard`` falls back to eager if that fails)."""
    for group in session.optimizer.param_groups:  # each group's own base rate, scheduled
        group["lr"] = learning_rate(session.cfg.train, ctx.step, total_steps, group["base_lr"])

    def forward_backward() -> ModelOutput:
        out = session.forward(x, ctx)
        session.optimizer.zero_grad(set_to_none=True)
        session.scaler.scale(out.loss.mean()).backward()
        return out

    out = session.forward.guard(forward_backward, session.model)
    session.scaler.step(session.optimizer)
    session.scaler.update()
    return out


def validate(session: Session, epoch: int, step: int) -> dict[str, Any]:
    """The per-image means of the model's terms on the validation split: the evaluation pass of
    ``vaelab metrics`` (metric "terms"), the one ``vaelab evaluate`` runs."""
    ctx = session.context(step, epoch)
    return metrics.evaluation_pass(
        session.model, session.splits.val, ["terms"], ctx, world=session.world
    )


def _save(
    run: Path, session: Session, counters: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """Rank 0's writes at the end of an epoch. Metrics first, state last: a crash in between
    leaves extra rows that resume drops, never a checkpoint whose metrics are missing. A write
    that fails says which checkpoint is intact."""
    model, epoch = session.model, counters["epoch"]
    try:
        atomic_write(run / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in rows))
        save_weights(run, model, {"epoch": epoch, "step": counters["step"]})
        state = dict(counters)
        if session.scaler.is_enabled():
            state["grad_scaler"] = session.scaler.state_dict()
        save_train_state(run, model, session.optimizer, state)
    except rundir.RunDirError as err:  # a full disk, a folder made read-only
        if epoch == 1:  # no whole checkpoint exists: keep no half of one either
            (run / rundir.WEIGHTS).unlink(missing_ok=True)
            raise rundir.RunDirError(
                f"{err}; no epoch had been saved, so nothing of it was kept: make "
                "room, then run the same command again"
            ) from None
        raise rundir.RunDirError(
            f"{err}; the last checkpoint in '{run}' (epoch {epoch - 1}) is intact: "
            f"make room, then `vaelab train --resume {run}`"
        ) from None
    session.board.epoch(rows[-2:], model, session.splits.val)


def learning_rate(
    tc: TrainConfig, step: int, total_steps: int, base_lr: float | None = None
) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a parameter group whose base
    rate is ``base_lr`` (default train.lr): a function of the step alone, so resume needs no
    scheduler state."""
    lr = tc.lr if base_lr is None else base_lr
    if tc.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0)))
    return lr


# -- helpers -----------------------------------------------------------------------------------
def _row(split: str, counters: dict[str, Any], means: dict[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl row: split, epoch, step, loss, the model's terms, elbo_nats, bpd,
    seconds."""
    return {
        "split": split,
        "epoch": counters["epoch"],
        "step": counters["step"],
        **means,
        "seconds": round(counters["seconds"], 3),
    }


def _epoch_line(name: str, epoch: int, epochs: int, rows: list[dict[str, Any]]) -> str:
    train, val = rows
    shown = " ".join(
        f"{k} {v:.3f}" if k == "bpd" else f"{k} {v:.2f}"
        for k, v in val.items()
        if k not in ("split", "epoch", "step", "seconds", "loss") and metrics.is_number(v)
    )
    return (
        f"{name} epoch {epoch}/{epochs}: train loss {train['loss']:.2f} | val loss "
        f"{val['loss']:.2f} {shown}"
    )


def _diverged(what: str, run: Path, last_epoch: int) -> TrainingDiverged:
    kept = (
        f"the last good checkpoint (epoch {last_epoch}) in '{run}' is intact"
        if last_epoch
        else f"no epoch had finished, so nothing of '{run}' was kept"
    )
    return TrainingDiverged(f"{what}; {kept} (try again with a smaller train.lr)")


def _all_finite(module: torch.nn.Module) -> bool:
    return all(
        torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()
    )


class _Board:
    """Optional TensorBoard logging (train.tensorboard=true): the metrics rows as scalars, and
    samples and reconstructions as images, once per epoch. Event files are TensorBoard's own
    append-only logs; on resume, events after the checkpoint's step are purged."""

    def __init__(self, enabled: bool) -> None:
        self.writer: Any = None
        self.writer_class: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "config key 'train.tensorboard': needs the tensorboard package "
                    "(pip install 'vaelab[tensorboard]')"
                ) from None
            self.writer_class = SummaryWriter

    def open(self, run: Path, step: int) -> None:
        if self.writer_class is not None:
            self.writer = self.writer_class(str(run / rundir.TENSORBOARD), purge_step=step or None)

    @torch.no_grad()
    def epoch(self, rows: list[dict[str, Any]], model: GenerativeModel, val: ImageDataset) -> None:
        if self.writer is None:
            return
        for row in rows:
            for key, value in row.items():
                if key not in ("split", "epoch", "step", "seconds") and metrics.is_number(value):
                    self.writer.add_scalar(f"{key}/{row['split']}", value, row["step"])
        model.eval()
        with seeded(0):
            with conditions.drawn(model, val, 16):
                self.writer.add_images("samples", model.sample(16).cpu(), rows[-1]["step"])
            if model.has_encoder:
                param = next(model.parameters())
                x = val.batch(slice(0, 8), param.device).to(param.dtype)
                with conditions.given(model, val, slice(0, 8)):
                    pairs = torch.cat([x, model.reconstruct(x)]).cpu()
                self.writer.add_images("val images, then reconstructions", pairs, rows[-1]["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
