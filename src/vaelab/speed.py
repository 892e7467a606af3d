"""The speed options, applied in one place: what makes a step faster without changing what it
computes (up to rounding).

- ``train.fast_layers`` (CPU): layers with a faster path in ``vaelab.nets.fast`` take it;
- ``train.channels_last``: NHWC memory format for the conv networks and their inputs;
- ``train.compile``: ``torch.compile`` of the forward pass, replayed as CUDA graphs on a GPU
  (not under torchrun); if compiling fails, the first step is redone without it, with a message;
- ``train.cpu_memory_cache`` (CPU, glibc; on by default): freed memory stays in the process for
  reuse, for the rest of the process's life (glibc cannot undo it): set it false to leave the
  allocator of a larger program (a notebook, a service) as it was;
- ``train.precision`` bf16/fp16: autocast for the networks (the losses stay fp32); ``auto``
  picks bf16 where the device computes it natively, fp32 elsewhere (``resolve_precision``), and
  an explicit bf16 or fp16 on a CPU that would emulate it is refused unless
  ``train.allow_emulated`` (emulated, they run 10x or more slower than fp32);
- ``train.fused_adam``: Adam's fused kernel (the trainer builds the optimizer with it);
- on CUDA, cuDNN's search for the fastest convolution algorithms (every step has one shape).

Evaluation's sampling estimators (importance sampling, AIS, the per-image posteriors of
``vaelab.gap``) call the decoder thousands of times per image, forward and backward in z, in
eval mode: ``for_sampling`` gives them the same function in a faster form (batch norms folded
into the convolutions before them, the run's channels_last).

``applied(...)`` names what is on, for the run's log. Process-wide settings (threads, cuDNN's
search) are set only for the duration of training, by ``process_settings``, and put back after;
the one exception is the memory cache (above). The trainer also puts torch's random generators
back after training (``rng.kept``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from vaelab import machine
from vaelab.config import ConfigError, TrainConfig
from vaelab.nets.fast import speed_up

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)
log = logging.getLogger("vaelab")


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


@contextlib.contextmanager
def process_settings(tc: TrainConfig) -> Iterator[None]:
    """Within the block: train.threads torch threads (0 keeps torch's default) and, on CUDA,
    cuDNN's algorithm search; both are put back after. train.cpu_memory_cache on a CPU takes
    effect for the rest of the process (``cache_cpu_memory``)."""
    cuda = torch.cuda.is_available() and tc.device in ("cuda", "auto")
    device = torch.device("cuda" if cuda else "cpu")
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu" and tc.cpu_memory_cache:
        cache_cpu_memory()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark


def resolve_precision(tc: TrainConfig, device: torch.device) -> tuple[str, str]:
    """The precision a run trains in on ``device``, and why: for ``auto`` the reason for its
    pick (bf16 where the device computes it natively: a CUDA GPU with bf16, a CPU with
    AVX512_BF16, AMX or ARM bf16; fp32 elsewhere); for an explicit precision "", or the warning
    for one the CPU emulates that train.allow_emulated lets run. Otherwise an explicit bf16 or
    fp16 that the device cannot run, or that the CPU would emulate, is a ConfigError."""
    arch = platform.machine()
    flags = machine.cpu_flags(arch) if device.type == "cpu" else frozenset()
    if tc.precision == "auto":
        return machine.fast_precision(device.type, flags, arch)
    if device.type == "cuda" and tc.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"config key 'train.precision': bf16 is not supported on {device}")
    why = machine.emulated(tc.precision, flags, arch) if device.type == "cpu" else None
    if why is None:
        return tc.precision, ""
    where = f"{why} (torch's CPU capability: {torch.backends.cpu.get_cpu_capability()})"
    if not tc.allow_emulated:
        raise ConfigError(
            f"config key 'train.precision': {tc.precision} would be 10x or more slower than fp32 "
            f"here, {where}: use fp32 or auto, or set train.allow_emulated=true to run it anyway"
        )
    return tc.precision, (
        f"train.precision={tc.precision} although emulated, 10x or more slower than fp32: {where} "
        "(train.allow_emulated=true)"
    )


def prepare(model: nn.Module, tc: TrainConfig, device: torch.device) -> nn.Module:
    """The model with train.fast_layers (CPU) and train.channels_last applied, in place."""
    if tc.fast_layers and device.type == "cpu":  # the fast paths are CPU ones
        speed_up(model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d that directly follows a convolution in an nn.Sequential
    into that convolution, in place: the norm becomes nn.Identity and the convolution computes
    conv(x) * s + t (s = weight / sqrt(running_var + eps), t = bias - running_mean * s), the
    same function up to rounding. A norm in training mode or without running statistics is left
    as it is."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i, (conv, norm) in enumerate(zip(seq, list(seq)[1:], strict=False)):
            if not (
                isinstance(conv, nn.Conv2d | nn.ConvTranspose2d)
                and type(norm) is nn.BatchNorm2d
                and not norm.training
                and norm.running_mean is not None
                and norm.running_var is not None
            ):
                continue
            with torch.no_grad():
                s = torch.rsqrt(norm.running_var + norm.eps)
                if norm.weight is not None:
                    s = s * norm.weight
                t = -norm.running_mean * s
                if norm.bias is not None:
                    t = t + norm.bias
                # a transposed convolution's weight is (in, out, kh, kw): out channels are dim 1
                shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
                conv.weight.mul_(s.view(shape))
                bias = t if conv.bias is None else conv.bias * s + t
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            seq[i + 1] = nn.Identity()
    return model


def for_sampling(model: M, channels_last: bool) -> M:
    """A copy of ``model`` for evaluation's sampling estimators: eval mode, no parameter
    gradients, batch norms folded (``fold_batch_norms``; in eval mode a batch norm is an affine
    map, and its backward in z costs as much as the convolution's), channels_last when the run
    trained with it. The same function as ``model`` up to rounding (about 1e-6 relative): the
    decoder with its input gradient, for 1,600 latents of the demo's vae (AVX2): 0.53 s as
    loaded, 0.38 s channels-last, 0.32 s folded too. vaelab.nets.fast's layers are not used:
    they speed up the weight gradient, which sampling does not need (0.56 s with them)."""
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    fold_batch_norms(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast


def inputs(x: torch.Tensor, tc: TrainConfig) -> torch.Tensor:
    """A batch in the memory format the model was prepared for."""
    return x.contiguous(memory_format=torch.channels_last) if tc.channels_last else x


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the networks' matmuls and convolutions in bf16 or fp16 (validation stays
    fp32; the models cast logits and posterior parameters to fp32 before any loss term)."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def applied(tc: TrainConfig, device: torch.device) -> list[str]:
    """The speed options in effect for a run, by their keys, for its log."""
    on = [f"train.precision={tc.precision}"]
    if tc.fast_layers and device.type == "cpu":
        on.append("train.fast_layers")
    if tc.channels_last:
        on.append("train.channels_last")
    if tc.compile:
        on.append("train.compile")
    if tc.fused_adam:
        on.append("train.fused_adam")
    if tc.cpu_memory_cache and device.type == "cpu":
        on.append("train.cpu_memory_cache")
    if device.type == "cuda":
        on.append("cudnn.benchmark")
    return on


class Forward:
    """The training forward pass as the speed options make it: autocast, and torch.compile with
    its fallback. ``module``: the model, or its DistributedDataParallel wrapper."""

    def __init__(
        self, module: nn.Module, tc: TrainConfig, device: torch.device, distributed: bool
    ) -> None:
        self.eager = module
        self.precision, self.device = tc.precision, device
        # On a GPU the step is launch-bound (a few hundred small kernels; the GPU idles between
        # them): "reduce-overhead" replays the compiled forward and backward as CUDA graphs.
        # Not under DistributedDataParallel, whose gradient all-reduce runs between the graphs.
        self.cuda_graphs = tc.compile and device.type == "cuda" and not distributed
        self.compiled: Any = (
            torch.compile(module, mode="reduce-overhead" if self.cuda_graphs else None)
            if tc.compile
            else None
        )
        self.pending = tc.compile  # the first (compiling) step has not run yet
        if tc.compile and device.type == "cpu":
            log.warning(
                "train.compile on a CPU: compiling takes about a minute, and the compiled step "
                "was not measured faster than vaelab's eager one (docs/performance.md)"
            )

    def __call__(self, *args: Any) -> Any:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        # "is None", not "or": a compiled module's truth value asks the model for its len()
        module = self.eager if self.compiled is None else self.compiled
        with autocast(self.precision, self.device):
            return module(*args)

    def guard(self, step: Callable[[], T], model: nn.Module) -> T:
        """Run ``step`` (a forward and backward pass; not the optimizer's update). The first
        step with train.compile compiles; if compiling fails, what the attempt changed (random
        generators, batch-norm statistics) is put back and the step is run again without
        compiling, with a message."""
        if not self.pending:
            return step()
        rng = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        try:
            out = step()
        except Exception as err:  # torch.compile fails in many ways (no C++ compiler, an op)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            print(f"train.compile: torch.compile failed ({type(err).__name__}: {first}); "
                  "training without it")  # fmt: skip
            self.compiled, self.pending, self.cuda_graphs = None, False, False
            torch.set_rng_state(rng)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
            return step()
        self.pending = False
        return out
