"""The training loop: any registered model, checkpoints every epoch, exact resume.

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
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vaelab import data, models
from vaelab.checkpoint import (
    STATE_FILE,
    CheckpointError,
    atomic_write,
    load_train_state,
    read_metrics,
    remove_stale_temporaries,
    save_model_config,
    save_train_state,
    save_weights,
)
from vaelab.config import ConfigError, RunConfig, TrainConfig, dump_yaml, load_config, to_dict
from vaelab.data import ImageDataset, Splits
from vaelab.models.base import GenerativeModel
from vaelab.rng import seeded

EpochCallback = Callable[[int, list[dict[str, Any]]], None]
VAL_SEED = 1234  # the noise used in validation: fixed, so epochs compare like for like
RESUMABLE_KEYS = (
    "train.epochs",
    "train.precision",
    "train.channels_last",
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
    model: GenerativeModel
    optimizer: torch.optim.Optimizer
    board: _Board


def _session(cfg: RunConfig, splits: Splits | None) -> _Session:
    """Device, data, model and optimizer: everything that can fail on bad input."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = _device(tc.device)
    board = _Board(tc.tensorboard)
    splits = splits if splits is not None else data.build(cfg.data, progress=tc.progress)
    if tc.kl_warmup_steps and not models.MODELS[cfg.model.name].supports_kl_warmup:
        raise ConfigError(
            f"config key 'train.kl_warmup_steps': expected 0 for model '{cfg.model.name}' "
            "(its objective has no KL weight to warm up)"
        )
    torch.manual_seed(tc.seed)
    model = models.build(cfg.model, splits.train.shape).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr)
    return _Session(cfg, splits, device, model, optimizer, board)


def train(
    cfg: RunConfig,
    out: str | Path,
    *,
    splits: Splits | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train a new run into ``out`` (which must not already hold a run); return its path.

    Bad input (a device that is not there, data that cannot be read) fails before the run
    directory is created.
    """
    run = Path(out)
    if (run / "config.yaml").exists():
        raise FileExistsError(f"'{run}' already holds a run: resume it with `--resume {run}`")
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"'{run}' exists and is not a directory")
    session = _session(cfg, splits)
    run.mkdir(parents=True, exist_ok=True)
    save_model_config(run, session.model, {"data": to_dict(cfg.data)})
    atomic_write(run / "config.yaml", dump_yaml(cfg))  # last: it marks the folder as a run
    return _fit(run, session, {"epoch": 0, "step": 0, "seconds": 0.0}, [], on_epoch_end)


def resume(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    splits: Splits | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Continue an interrupted run from its last checkpoint, or extend it (train.epochs=N).

    An interrupted run resumed as it was ends with exactly the weights of an uninterrupted one.
    Extending a run with train.lr_schedule=cosine stretches the rest of its schedule to the new
    length, so it ends elsewhere than a run planned that long from the start.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"'{run / 'config.yaml'}' not found: is '{run}' a vaelab run?")
    for text in overrides or []:
        key = text.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"config key '{key}' cannot change when resuming (allowed: "
                f"{', '.join(RESUMABLE_KEYS)})"
            )
    cfg = load_config(run / "config.yaml", overrides)
    session = _session(cfg, splits)
    remove_stale_temporaries(run)
    counters: dict[str, Any] = {"epoch": 0, "step": 0, "seconds": 0.0}
    rows: list[dict[str, Any]] = []
    if (run / STATE_FILE).is_file():
        counters = load_train_state(run, session.model, session.optimizer)
        # Rows logged after the checkpoint (a crash between the two writes) are dropped.
        rows = [r for r in read_metrics(run) if r["epoch"] <= counters["epoch"]]
    if cfg.train.epochs < counters["epoch"]:
        raise ConfigError(
            f"config key 'train.epochs': '{run}' has finished {counters['epoch']} epochs, "
            f"expected at least that many, got {cfg.train.epochs}"
        )
    if overrides:
        atomic_write(run / "config.yaml", dump_yaml(cfg))
    return _fit(run, session, counters, rows, on_epoch_end)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': cuda was asked for but none is available")
    return torch.device(name)


def _diverged(what: str, run: Path, last_epoch: int) -> TrainingDiverged:
    kept = (
        f"the last good checkpoint (epoch {last_epoch}) in '{run}' is intact"
        if last_epoch
        else f"no epoch had finished, so '{run}' holds no checkpoint"
    )
    return TrainingDiverged(f"{what}; {kept} (try a smaller train.lr)")


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
    cfg, model, optimizer, device = session.cfg, session.model, session.optimizer, session.device
    train_set, tc = session.splits.train, cfg.train
    if counters["epoch"] >= tc.epochs:
        print(f"{run}: already trained for {counters['epoch']} of {tc.epochs} epochs")
        return run

    n_train = len(train_set)
    batch_size = min(tc.batch_size, n_train)
    # Drop the last partial batch: every step sees the same batch size (batch-norm statistics
    # from a handful of images are noise), and every image is seen within two epochs.
    steps_per_epoch = n_train // batch_size
    session.board.open(run, counters["step"])
    try:
        for epoch in range(counters["epoch"] + 1, tc.epochs + 1):
            start = time.perf_counter()
            model.train()
            order = np.random.default_rng([tc.seed, epoch]).permutation(n_train)
            sums, running = _Sums(), 0.0
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"{cfg.model.name} epoch {epoch}/{tc.epochs}",
                disable=not tc.progress,
                leave=False,
                dynamic_ncols=True,
            )
            for i in range(steps_per_epoch):
                x = train_set.batch(order[i * batch_size : (i + 1) * batch_size], device)
                if cfg.data.flip:
                    x = data.random_hflip(x)
                if tc.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                model.step = counters["step"]
                model.kl_anneal = kl_anneal(tc, counters["step"])
                with _autocast(tc.precision, device):
                    out = model(x)
                loss = out.loss.mean()
                value = loss.item()  # one sync per step: the NaN check and the progress bar
                if not math.isfinite(value):
                    bar.close()
                    step = counters["step"] + 1
                    raise _diverged(
                        f"loss became {value} at epoch {epoch}, step {step}", run, epoch - 1
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(tc, counters["step"], tc.epochs * steps_per_epoch)
                optimizer.step()
                counters["step"] += 1
                sums.add(out)
                running += (value - running) / (i + 1)
                bar.update(1)
                bar.set_postfix(loss=f"{running:.2f}", refresh=False)
            bar.close()
            # A finite loss can still come with non-finite gradients; such weights are never saved.
            if not _all_finite(model):
                raise _diverged(
                    f"the weights became non-finite in epoch {epoch} (by step {counters['step']})",
                    run,
                    epoch - 1,
                )
            counters["seconds"] += time.perf_counter() - start
            train_row = _row("train", epoch, counters, sums.means(), model)
            start = time.perf_counter()
            val_means = evaluate_split(model, session.splits.val, batch_size, device)
            counters["seconds"] += time.perf_counter() - start
            val_row = _row("val", epoch, counters, val_means, model)
            counters["epoch"] = epoch
            rows += [train_row, val_row]
            # Metrics first, state last: a crash in between leaves extra rows that resume drops,
            # never a checkpoint whose metrics are missing.
            atomic_write(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            save_weights(run, model, {"epoch": epoch, "step": counters["step"]})
            save_train_state(run, model, optimizer, counters)
            session.board.epoch([train_row, val_row], model, session.splits.val)
            if tc.progress:
                print(_epoch_line(cfg.model.name, epoch, tc.epochs, train_row, val_row), flush=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch, [train_row, val_row])
    finally:
        session.board.close()
    return run


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the networks' matmuls and convolutions (validation stays fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
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
    """Per-image sums of the named terms, kept as tensors (read once per epoch)."""

    def __init__(self) -> None:
        self.n = 0
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, out: models.ModelOutput) -> None:
        self.n += out.loss.shape[0]
        terms = {"loss": out.loss, "recon": out.recon, "kl": out.kl, "elbo_nats": out.elbo}
        for name, t in terms.items():
            if t is not None:
                total = t.detach().double().sum()
                self.totals[name] = self.totals[name] + total if name in self.totals else total

    def means(self) -> dict[str, float | None]:
        """Per-image means; None for a term the model does not have (kl of decoder_only)."""
        return {k: (self.totals[k] / self.n).item() if k in self.totals else None for k in TERMS}


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
) -> dict[str, float | None]:
    """Per-image means of the model's terms over a whole split, in eval mode, seeded noise."""
    was_training = model.training
    model.eval()
    sums = _Sums()
    with seeded(seed):
        for i in range(0, len(dataset), batch_size):
            sums.add(model(dataset.batch(slice(i, i + batch_size), device)))
    model.train(was_training)
    return sums.means()
