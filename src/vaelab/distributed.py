"""Data-parallel training with torchrun: the process group, batch-norm across ranks, sums.

``torchrun --nproc_per_node N -m vaelab train ...`` starts N copies of the trainer; each reads
RANK / WORLD_SIZE / LOCAL_RANK from its environment (set by torchrun) and joins one process group:
NCCL on GPUs, gloo on CPUs. Without those variables everything here is a no-op for one process.

What keeps N processes equal to one (see train.py for the loop and rng.py for the noise):
- the global batch is train.batch_size whatever N is; rank r computes rows r::N of it;
- gradients are averaged by DistributedDataParallel, so the step is that of the global batch;
- batch-norm statistics are those of the global batch (``sync_batchnorm``);
- every rank draws the noise of the whole global batch and keeps its own rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vaelab import losses


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and prints; the others only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_environment() -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (one process if unset)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError(
            "environment variables RANK / WORLD_SIZE / LOCAL_RANK: expected integers "
            f"(got {os.environ.get('RANK')!r} / {os.environ.get('WORLD_SIZE')!r} / "
            f"{os.environ.get('LOCAL_RANK')!r})"
        ) from None
    return World(rank, size, local_rank)


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL for CUDA devices, gloo otherwise) if there is more than one
    process and it is not joined yet."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=world.rank, world_size=world.size)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(t: Tensor, world: World) -> Tensor:
    """The sum of ``t`` over all ranks (in place; ``t`` itself when there is one process)."""
    if world.distributed:
        dist.all_reduce(t)
    return t


class _AllSum(torch.autograd.Function):
    """The sum over ranks, differentiable: the gradient of a sum over ranks is the sum over
    ranks of the gradients (every rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def differentiable_all_reduce(t: Tensor) -> Tensor:
    return _AllSum.apply(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any backend.

    torch.nn.SyncBatchNorm needs a GPU; this is its CPU (gloo) counterpart. Two all-reduces per
    layer (the mean, then the centred squares) give the same numbers as one process's
    BatchNorm2d on the whole batch, up to summation order. The all-reduce is differentiable, so
    the gradient also flows through the statistics, as in one process.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dtype = x.dtype
        x = losses.full_precision(x)  # fp32 statistics under autocast
        dims = (0, 2, 3)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        stats = differentiable_all_reduce(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:-1] / n
        centred = x - mean[None, :, None, None]
        var = differentiable_all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: a cumulative average, as BatchNorm2d
                factor = (
                    1 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                )
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * n / (n - 1), factor)  # unbiased, as BatchNorm2d
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(dtype)  # the input's dtype, as BatchNorm2d under autocast


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm2d computing global-batch statistics: torch's SyncBatchNorm
    on CUDA, ``GlobalBatchNorm2d`` elsewhere. Parameters and buffers are kept (same state_dict
    keys, so checkpoints move freely between one process and many)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            like = child.weight if child.affine else child.running_mean
            if like is not None:
                synced = synced.to(device=like.device, dtype=like.dtype)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, device)
    return model
