"""The trainer: any registered model, checkpoints every epoch, exact resume.

The module is ``vaelab.trainer``; ``vaelab.train`` and ``vaelab.resume`` are its two entry points.

Read top to bottom: ``train`` starts a run, ``resume`` continues one, both hand over to ``_fit``,
which runs epochs of (shuffle, step, validate, write). The loop only reads the model's named
per-image terms, so it never changes when a variant is added.

Reproducibility: the shuffle of epoch e depends only on (train.seed, e), and the model's noise
comes from torch's global generator, whose state is saved with every checkpoint. Validation runs
under its own fixed seed, so it neither consumes training randomness nor wobbles between epochs.
A resumed run therefore ends with bit-for-bit the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from vaelab import data, distributed, models, progress, rundir
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
from vaelab.models.base import GenerativeModel
from vaelab.nets.fast import speed_up
from vaelab.rng import noise_shard, seeded

EpochCallback = Callable[[int, list[dict[str, Any]]], None]
VAL_SEED = 1234  # the noise used in validation: fixed, so epochs compare like for like
FINGERPRINT_CHUNK = 8192  # images hashed at a time by data_fingerprint
# Keys that may change when a run is continued: how it runs, not what it learns. The data's
# location may change too: its pixels are checked against the run's fingerprint.
RESUMABLE_KEYS = (
    "data.root",
    "data.cache_dir",
    "data.workers",
    "train.epochs",
    "train.precision",
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
            self.writer = self.writer_class(str(run / "tensorboard"), purge_step=step or None)

    @torch.no_grad()
    def epoch(self, rows: list[dict[str, Any]], model: GenerativeModel, val: ImageDataset) -> None:
        if self.writer is None:
            return
        for row in rows:
            for key in (*TERMS, "bpd"):
                if row[key] is not None:
                    self.writer.add_scalar(f"{key}/{row['split']}", row[key], row["step"])
        model.eval()
        with seeded(0):
            self.writer.add_images("samples", model.sample(16).cpu(), rows[-1]["step"])
            if model.has_encoder:
                x = val.batch(slice(0, 8), next(model.parameters()).device)
                pairs = torch.cat([x, model.reconstruct(x)]).cpu()
                self.writer.add_images("val images, then reconstructions", pairs, rows[-1]["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class _Session:
    """What a run trains with, all made before anything is written."""

    cfg: RunConfig
    splits: Splits
    device: torch.device
    world: World
    model: GenerativeModel  # the model itself: what is saved and evaluated
    forward: Callable[[torch.Tensor], models.ModelOutput]  # DDP / compiled wrapper, or model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    board: _Board
    eager: Callable[[torch.Tensor], models.ModelOutput]  # ``forward`` without torch.compile
    compile_pending: bool  # train.compile is on and the first (compiling) step has not run
    cuda_graphs: bool = False  # the compiled forward and backward replay as CUDA graphs


def cache_cpu_memory() -> bool:
    """Make this process keep the memory it frees, for its next allocations, from now until it
    exits; return whether the C library took the setting (glibc does; elsewhere nothing
    changes, and an allocator loaded with LD_PRELOAD does its own caching anyway).

    glibc hands every block of 32 MiB or more (a CelebA-64 activation at batch 64 in fp32 is
    33.5 MB) straight to the OS with mmap and unmaps it when freed, so each step faults every
    page of those tensors in again: the plain fp32 loop spends about 40% of its time there
    (benchmarks/throughput.py). With mmap off and trimming raised, freed memory stays in the
    heap and is reused, as PyTorch's CUDA caching allocator does on GPUs. The cost: the
    process's resident memory stays at its peak until it exits.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    # Trimming first: if that is refused, mmap stays on and nothing has changed.
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))


def _session(cfg: RunConfig, splits: Splits | None) -> _Session:
    """Device, process group, data, model and optimizer: everything that can fail on bad input."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    world = distributed.from_environment()
    device = _device(tc.device, world)
    if device.type == "cuda":
        # Every step has the same shapes (the last partial batch is dropped), so cuDNN's
        # one-off search for the fastest convolution algorithms pays for itself at once.
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu" and tc.cpu_memory_cache:
        cache_cpu_memory()
    if tc.batch_size % world.size:
        raise ConfigError(
            f"config key 'train.batch_size': the global batch is split over {world.size} "
            f"processes, expected a multiple of {world.size}, got {tc.batch_size}"
        )
    if tc.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"config key 'train.precision': bf16 is not supported on {device}")
    board = _Board(tc.tensorboard and world.is_main)
    if tc.kl_warmup_steps and not models.MODELS[cfg.model.name].supports_kl_warmup:
        raise ConfigError(
            f"config key 'train.kl_warmup_steps': expected 0 for model '{cfg.model.name}' "
            "(its objective has no KL weight to warm up)"
        )
    if world.distributed:
        _check_splittable(cfg)
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
    torch.manual_seed(tc.seed)  # the same on every rank: same weights, same noise
    # Refused before anything is allocated: a model larger than the memory it would train in.
    width = 8 if tc.precision == "fp64" else 4
    models.check_size(cfg.model, splits.train.shape, True, device, bytes_per_value=width)
    model = models.build(cfg.model, splits.train.shape).to(device)
    if tc.fast_layers and device.type == "cpu":  # the fast paths are CPU ones
        speed_up(model)
    if tc.precision == "fp64":
        model = model.double()
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward: Any = model
    if world.distributed:
        distributed.sync_batchnorm(model, device)
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eager = forward
    graphs = tc.compile and device.type == "cuda" and not world.distributed
    if tc.compile:
        # On a GPU the step is launch-bound (a few hundred small kernels; the GPU idles between
        # them): "reduce-overhead" replays the compiled forward and backward as CUDA graphs.
        # Not under DistributedDataParallel, whose gradient all-reduce runs between the graphs.
        forward = torch.compile(forward, mode="reduce-overhead" if graphs else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, fused=tc.fused_adam or None)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    return _Session(
        cfg,
        splits,
        device,
        world,
        model,
        forward,
        optimizer,
        scaler,
        board,
        eager,
        tc.compile,
        graphs,
    )


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
    session = _session(cfg, splits)
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
            atomic_write(run / rundir.CONFIG, dump_yaml(cfg))  # last: it marks the folder as a run
        except BaseException:
            _remove_unfinished(run, created, lock)
            raise
    try:
        return _fit(run, session, {"epoch": 0, "step": 0, "seconds": 0.0}, [], on_epoch_end)
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
        cfg, counters, rows, session = _reopen(run, overrides or [], splits, accept_changes)
        if world.is_main:
            rundir.remove_stale_temporaries(run)
            if overrides:
                atomic_write(run / rundir.CONFIG, dump_yaml(cfg))
        return _fit(run, session, counters, rows, on_epoch_end)
    finally:
        if lock is not None:
            lock.release()


def _reopen(
    run: Path, overrides: list[str], splits: Splits | None, accept_changes: bool
) -> tuple[RunConfig, dict[str, Any], list[dict[str, Any]], _Session]:
    """What ``resume`` continues from: the config, counters, metrics rows and session, each
    checked against what the run recorded when it began."""
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
    session = _session(cfg, splits)
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
    return cfg, counters, rows, session


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


def _check_splittable(cfg: RunConfig) -> None:
    """Refuse what would not train the same model on several processes as on one."""
    why = models.MODELS[cfg.model.name].batch_statistic
    if why:
        raise ConfigError(
            f"config key 'model.name': {cfg.model.name} cannot be split over torchrun "
            f"processes ({why}, which each process would compute on its share); train it in "
            "one process"
        )
    if cfg.model.free_bits > 0:
        raise ConfigError(
            "config key 'model.free_bits': free bits use the batch-mean KL per dimension, which "
            "each torchrun process would compute on its share; expected 0 under torchrun"
        )


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


def _fit(
    run: Path,
    session: _Session,
    counters: dict[str, Any],
    rows: list[dict[str, Any]],
    on_epoch_end: EpochCallback | None,
) -> Path:
    cfg, model, device, world = session.cfg, session.model, session.device, session.world
    train_set, tc = session.splits.train, cfg.train
    if counters["epoch"] >= tc.epochs:
        if world.is_main:
            print(f"{run}: already trained for {counters['epoch']} of {tc.epochs} epochs")
        return run

    n_train = len(train_set)
    # The global batch; every rank computes rows rank::world of it (batch_size divides evenly,
    # and under torchrun there are at least batch_size images: see _session).
    batch_size = min(tc.batch_size, n_train)
    # Drop the last partial batch: every step sees the same batch size (batch-norm statistics
    # from a handful of images are noise), and every image is seen within two epochs.
    steps_per_epoch = n_train // batch_size
    total_steps = tc.epochs * steps_per_epoch
    source = batch_source(train_set, device)
    show = tc.progress and world.is_main
    dtype = torch.float64 if tc.precision == "fp64" else torch.float32
    if world.is_main:
        session.board.open(run, counters["step"])
    try:
        for epoch in range(counters["epoch"] + 1, tc.epochs + 1):
            start = time.perf_counter()
            model.train()
            order = np.random.default_rng([tc.seed, epoch]).permutation(n_train)
            order = order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
            mine = torch.from_numpy(order[:, world.rank :: world.size].copy())
            if isinstance(source, DeviceImages):
                mine = mine.to(device)
            sums = _Sums()
            bar = progress.bar(
                steps_per_epoch,
                f"{cfg.model.name} epoch {epoch}/{tc.epochs}",
                show,
                leave=False,
                dynamic_ncols=True,
            )
            seen, window_start = torch.zeros((), device=device, dtype=torch.float64), 0
            for i in range(steps_per_epoch):
                step = counters["step"]
                x = source.batch(mine[i], device).to(dtype)
                with noise_shard(world.rank, world.size, batch_size):
                    if cfg.data.flip:
                        x = data.random_hflip(x)
                    if tc.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    out = _step(session, x, step, total_steps)
                counters["step"] += 1
                sums.add(out)
                bar.update(1)
                if (i + 1) % tc.log_every == 0 or i + 1 == steps_per_epoch:
                    # The only host-device synchronisation of the loop: every log_every steps.
                    n = (i + 1 - window_start) * batch_size
                    total = sums.loss_total()
                    value = distributed.all_sum(total - seen, world).item() / n
                    if not math.isfinite(value):
                        bar.close()
                        first = counters["step"] - (i - window_start)
                        where = (
                            f"step {first}"
                            if first == counters["step"]
                            else f"between steps {first} and {counters['step']}"
                        )
                        raise _diverged(
                            f"loss became {value} at epoch {epoch}, {where}", run, epoch - 1
                        )
                    bar.set_postfix(loss=f"{value:.2f}", refresh=False)
                    seen, window_start = total, i + 1
            bar.close()
            # A finite loss can still come with non-finite gradients; such weights are never saved.
            if not _all_finite(model):
                raise _diverged(
                    f"the weights became non-finite in epoch {epoch} (by step {counters['step']})",
                    run,
                    epoch - 1,
                )
            counters["seconds"] += time.perf_counter() - start
            train_row = _row("train", epoch, counters, sums.means(world), model)
            start = time.perf_counter()
            val_means = evaluate_split(model, session.splits.val, batch_size, device, world=world)
            counters["seconds"] += time.perf_counter() - start
            if not math.isfinite(val_means["loss"] or 0.0):
                # Finite weights can still be too large for a finite forward pass.
                raise _diverged(
                    f"the validation loss became {val_means['loss']} after epoch {epoch}",
                    run,
                    epoch - 1,
                )
            val_row = _row("val", epoch, counters, val_means, model)
            counters["epoch"] = epoch
            rows += [train_row, val_row]
            if world.is_main:
                try:
                    _write_epoch(run, session, counters, rows)
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
                if show:
                    print(
                        _epoch_line(cfg.model.name, epoch, tc.epochs, train_row, val_row),
                        flush=True,
                    )
                if on_epoch_end is not None:
                    on_epoch_end(epoch, [train_row, val_row])
    finally:
        session.board.close()
    distributed.barrier(world)  # no rank leaves before rank 0 has written the last epoch
    return run


def _step(session: _Session, x: torch.Tensor, step: int, total_steps: int) -> models.ModelOutput:
    """One optimizer step on batch ``x``: forward under autocast, the mean loss backward (scaled
    for fp16), Adam. No host-device synchronisation. With train.compile the first step compiles;
    if compiling fails, the step is redone without it and training goes on, with a message."""
    tc, model, optimizer = session.cfg.train, session.model, session.optimizer
    model.step = step
    model.kl_anneal = kl_anneal(tc, step)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(tc, step, total_steps)
    compiling = session.compile_pending
    rng = _rng_states(session.device) if compiling else None
    # A compile can fail part-way through a forward: keep what that would change (batch-norm
    # statistics) to put it back.
    buffers = {k: b.clone() for k, b in model.named_buffers()} if compiling else {}
    try:
        if session.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        with _autocast(tc.precision, session.device):
            out = session.forward(x)
        optimizer.zero_grad(set_to_none=True)
        session.scaler.scale(out.loss.mean()).backward()
    except Exception as err:  # torch.compile fails in many ways (no C++ compiler, an op)
        if not compiling:
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        print(f"train.compile: torch.compile failed ({type(err).__name__}: {first}); "
              "training without it")  # fmt: skip
        session.forward, session.compile_pending, session.cuda_graphs = session.eager, False, False
        _set_rng_states(session.device, rng)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
        return _step(session, x, step, total_steps)
    session.compile_pending = False
    session.scaler.step(optimizer)
    session.scaler.update()
    return out


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(device: torch.device, states: Any) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def _write_epoch(
    run: Path, session: _Session, counters: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """Rank 0's writes at the end of an epoch. Metrics first, state last: a crash in between
    leaves extra rows that resume drops, never a checkpoint whose metrics are missing."""
    model, epoch = session.model, counters["epoch"]
    atomic_write(run / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    save_weights(run, model, {"epoch": epoch, "step": counters["step"]})
    state = dict(counters)
    if session.scaler.is_enabled():
        state["grad_scaler"] = session.scaler.state_dict()
    save_train_state(run, model, session.optimizer, state)
    session.board.epoch(rows[-2:], model, session.splits.val)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the networks' matmuls and convolutions in bf16 or fp16 (validation stays
    fp32; the models cast logits and posterior parameters to fp32 before any loss term)."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def kl_anneal(tc: TrainConfig, step: int) -> float:
    """The KL warm-up factor for optimizer step ``step``: 0 -> 1 linearly over
    train.kl_warmup_steps (Bowman et al. 2016; Sonderby et al. 2016), then 1."""
    if tc.kl_warmup_steps <= 0:
        return 1.0
    return min(1.0, step / tc.kl_warmup_steps)


def learning_rate(tc: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based): a function of the step alone,
    so resume needs no scheduler state."""
    if tc.lr_schedule == "cosine":
        return tc.lr * 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0)))
    return tc.lr


def _epoch_line(
    name: str, epoch: int, epochs: int, train: dict[str, Any], val: dict[str, Any]
) -> str:
    return (
        f"{name} epoch {epoch}/{epochs}: train loss {train['loss']:.2f} | val loss "
        f"{val['loss']:.2f} recon {val['recon']:.2f} kl {_fmt(val['kl'])} elbo "
        f"{val['elbo_nats']:.2f} nats ({val['bpd']:.3f} bpd)"
    )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


TERMS = ("loss", "recon", "kl", "elbo_nats")


class _Sums:
    """Per-image sums of the named terms, kept as one float64 tensor on the device (a few
    kernels per step, no synchronisation), read once per epoch."""

    def __init__(self) -> None:
        self.n = 0
        self.names: list[str] = []
        self.total: torch.Tensor | None = None

    def add(self, out: models.ModelOutput) -> None:
        terms = {"loss": out.loss, "recon": out.recon, "kl": out.kl, "elbo_nats": out.elbo}
        if self.total is None:
            self.names = [k for k, t in terms.items() if t is not None]
        batch = torch.stack([terms[k].detach() for k in self.names]).double().sum(1)
        self.total = batch if self.total is None else self.total + batch
        self.n += out.loss.shape[0]

    def loss_total(self) -> torch.Tensor:
        """The sum of the loss so far (a 0-d tensor on the device)."""
        assert self.total is not None
        return self.total[0].clone()

    def means(self, world: World | None = None) -> dict[str, float | None]:
        """Per-image means over all ranks; None for a term the model does not have (kl of
        decoder_only). One synchronisation."""
        assert self.total is not None
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.total.device)
        packed = distributed.all_sum(torch.cat([self.total, n]), world or World()).tolist()
        sums = dict(zip(self.names, packed, strict=False))
        return {k: sums[k] / packed[-1] if k in sums else None for k in TERMS}


def _row(
    split: str, epoch: int, counters: dict[str, Any], means: dict[str, Any], model: GenerativeModel
) -> dict[str, Any]:
    """One metrics.jsonl row, keys in the documented order; bpd derived from elbo_nats."""
    elbo = means["elbo_nats"]
    return {
        "split": split,
        "epoch": epoch,
        "step": counters["step"],
        **{k: means[k] for k in TERMS},
        "bpd": None if elbo is None else model.bits_per_dim(elbo),
        "seconds": round(counters["seconds"], 3),
    }


@torch.no_grad()
def evaluate_split(
    model: GenerativeModel,
    dataset: ImageDataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    seed: int = VAL_SEED,
    *,
    world: World | None = None,
) -> dict[str, float | None]:
    """Per-image means of the model's terms over a whole split, in eval mode, seeded noise.

    Under torchrun each rank computes rows rank::world of every batch (with that batch's noise,
    as in one process) and the sums are added over ranks.
    """
    world = world or World()
    dtype = next(model.parameters()).dtype  # fp64 for a train.precision=fp64 run, else fp32
    was_training = model.training
    model.eval()
    sums = _Sums()
    with seeded(seed):
        for i in range(0, len(dataset), batch_size):
            n = min(batch_size, len(dataset) - i)
            mine = (
                np.arange(i + world.rank, i + n, world.size)
                if world.distributed
                else slice(i, i + n)
            )
            with noise_shard(world.rank, world.size, n):
                sums.add(model(dataset.batch(mine, device).to(dtype)))
    model.train(was_training)
    return sums.means(world)
