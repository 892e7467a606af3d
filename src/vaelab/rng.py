"""Seeded randomness that leaves the caller's random streams untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)``, then restore every generator (CPU and all
    CUDA devices) so that training randomness is not consumed or reset by evaluation."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def kept() -> Iterator[None]:
    """Run a block that seeds and draws from torch's generators (training), then put every
    generator (CPU and all CUDA devices) back as the caller had it."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


# -- noise for one rank's shard of a global batch ------------------------------------------
# Under data-parallel training each rank holds the rows rank::world of the global batch. The
# model's noise is drawn through ``batch_randn``/``batch_rand``: every rank draws the noise of
# the whole global batch from its (identically seeded) generator and keeps its own rows. So each
# image gets the noise it would get in a single process, the generators of all ranks stay in
# step, and a run can resume on any number of processes. Costs a draw of world x the noise.
_SHARD: tuple[int, int, int] | None = None  # (rank, world, global batch size) while sharded


@contextmanager
def noise_shard(rank: int, world: int, global_batch: int) -> Iterator[None]:
    """Within the block, batch noise is this rank's rows (rank::world) of the noise of a global
    batch of ``global_batch`` images."""
    global _SHARD
    before, _SHARD = _SHARD, (rank, world, global_batch)
    try:
        yield
    finally:
        _SHARD = before


def shard() -> tuple[int, int, int] | None:
    """(rank, world, global batch size) while batch noise is split over more than one process
    (``noise_shard``); None in one process. This rank holds rows rank::world of the batch."""
    return _SHARD if _SHARD is not None and _SHARD[1] > 1 else None


def _draw(
    shape: tuple[int, ...],
    dim: int,
    draw: Callable[[tuple[int, ...]], torch.Tensor],
    whole: bool = False,
) -> torch.Tensor:
    if _SHARD is None or _SHARD[1] == 1:
        return draw(shape)
    rank, world, n = _SHARD
    rows = range(rank, n, world)
    if shape[dim] != len(rows):
        raise RuntimeError(
            f"batch noise of {shape[dim]} images, but rank {rank} of {world} holds {len(rows)} "
            f"of a global batch of {n}"
        )
    noise = draw((*shape[:dim], n, *shape[dim + 1 :]))
    if whole:
        return noise
    return noise[(slice(None),) * dim + (slice(rank, None, world),)].contiguous()


def batch_randn(
    shape: tuple[int, ...],
    dim: int,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``torch.randn(shape)`` where axis ``dim`` indexes the images of the (local) batch."""
    return _draw(shape, dim, lambda s: torch.randn(s, device=device, dtype=dtype))


def batch_rand(shape: tuple[int, ...], dim: int, *, device: torch.device | str) -> torch.Tensor:
    """``torch.rand(shape)`` where axis ``dim`` indexes the images of the (local) batch."""
    return _draw(shape, dim, lambda s: torch.rand(s, device=device))


def global_batch_rand(
    shape: tuple[int, ...], dim: int, *, device: torch.device | str
) -> torch.Tensor:
    """The noise ``batch_rand(shape, dim)`` takes its rows from: ``torch.rand`` of the whole
    global batch (axis ``dim`` as long as the global batch; ``shape`` itself in one process),
    the same on every rank. For a model that mixes images across the global batch (factor_vae
    permutes its codes over it); it draws what ``batch_rand`` would, so the generators stay in
    step."""
    return _draw(shape, dim, lambda s: torch.rand(s, device=device), whole=True)
