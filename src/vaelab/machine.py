"""Facts about the machine vaelab runs on, read where they are needed: the memory available,
and what the processor computes natively (``vaelab env`` prints them)."""

from __future__ import annotations

import math
import os
import platform
import time
from typing import Any

import torch


def available_memory() -> int | None:
    """Bytes of memory a new allocation could still get: MemAvailable of /proc/meminfo where
    present, else the machine's physical memory; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# -- what the processor computes natively --------------------------------------------------------
# CPU flags (Linux /proc/cpuinfo names) that decide which precision is fast. x86: AVX512_BF16
# or AMX-BF16 compute bf16 natively; without them oneDNN emulates bf16 (10-16x slower than fp32
# on an AVX2-only AMD EPYC Zen 3, issue 15). ARM: the "bf16" feature (Armv8.6).
FLAGS_THAT_MATTER = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
    "asimd",
    "sve",
    "bf16",
    "fphp",
    "asimdhp",
)
# torch's own CPU detection (its cpuinfo library, also where /proc/cpuinfo is not: macOS,
# Windows), by the /proc/cpuinfo flag each check stands for.
TORCH_CHECKS = {
    "avx2": "_is_avx2_supported",
    "avx512f": "_is_avx512_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "amx_tile": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}
# Every CPU with AMX tiles (Intel Sapphire Rapids and later) computes bf16 in them.
NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "amx_tile"}
NATIVE_FP16 = {"avx512_fp16", "amx_fp16"}


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """The CPU's model name and the FLAGS_THAT_MATTER it reports ("" and none where the file
    cannot be read: not Linux)."""
    model, flags = "", set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split()) & set(FLAGS_THAT_MATTER)
    except OSError:
        pass
    return model, frozenset(flags)


def torch_cpu_flags(arch: str) -> frozenset[str]:
    """The FLAGS_THAT_MATTER as torch itself reports them (the checks this torch has)."""
    found = set()
    for flag, name in TORCH_CHECKS.items():
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            found.add(flag)
    if _is_arm(arch):  # on ARM, oneDNN's bf16 check is the CPU's bf16 feature
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        if check is not None and check():
            found.add("bf16")
    return frozenset(found)


def cpu_flags(arch: str | None = None) -> frozenset[str]:
    """The FLAGS_THAT_MATTER of this CPU: those /proc/cpuinfo lists and those torch reports."""
    return cpu_info()[1] | torch_cpu_flags(arch or platform.machine())


def _is_arm(arch: str) -> bool:
    return arch in ("aarch64", "arm64")


def native_bf16(flags: frozenset[str], arch: str) -> bool:
    """Whether a CPU with these flags computes bf16 natively (``arch``: platform.machine())."""
    if _is_arm(arch):
        return "bf16" in flags
    return bool(flags & NATIVE_BF16)


def native_fp16(flags: frozenset[str], arch: str) -> bool:
    """Whether a CPU with these flags computes fp16 natively (ARM's half-precision arithmetic,
    x86's AVX512-FP16 or AMX-FP16)."""
    if _is_arm(arch):
        return bool(flags & {"fphp", "asimdhp"})
    return bool(flags & NATIVE_FP16)


def emulated(precision: str, flags: frozenset[str], arch: str) -> str | None:
    """Why a CPU with these flags emulates ``precision`` (bf16 or fp16), None where it does
    not (fp32 and fp64 are native everywhere)."""
    if precision == "bf16" and not native_bf16(flags, arch):
        needs = "ARM bf16" if _is_arm(arch) else "avx512_bf16 or amx_bf16"
    elif precision == "fp16" and not native_fp16(flags, arch):
        needs = "ARM fphp" if _is_arm(arch) else "avx512_fp16 or amx_fp16"
    else:
        return None
    return f"this CPU has no {needs}: it emulates {precision}"


def fast_precision(device: str, flags: frozenset[str], arch: str) -> tuple[str, str]:
    """The precision that is fastest and correct here, and why: bf16 where the device computes
    it natively (a CUDA GPU that supports it, a CPU with AVX512_BF16, AMX-BF16 or ARM bf16),
    fp32 elsewhere. ``device``: "cpu" or "cuda"."""
    if device == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name()} computes bf16 natively"
        return "fp32", "this GPU does not support bf16"
    if native_bf16(flags, arch):
        which = sorted(flags & (NATIVE_BF16 | {"bf16"}))
        return "bf16", f"the CPU computes bf16 natively ({', '.join(which)})"
    return (
        "fp32",
        "the CPU has no avx512_bf16, amx_bf16 or ARM bf16: it emulates bf16 (a CelebA-64 step "
        "11-16x slower than fp32 on an AVX2-only AMD EPYC)",
    )


def matmul_rate(dtype: torch.dtype, n: int, budget: float = 1.0) -> float:
    """GFLOP/s of n x n matmuls in ``dtype`` on the CPU: the best of as many as fit in about
    ``budget`` seconds (at least two)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best, spent, runs = math.inf, 0.0, 0
    while runs < 2 or spent < budget:
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return 2 * n**3 / best / 1e9


def facts(measure: bool = True) -> dict[str, Any]:
    """What decides vaelab's speed here: the CPU, its flags, torch's build and capability, the
    CUDA device, the thread count, measured matmul rates (``measure``) and the precision to
    train in. ``vaelab env`` prints it; benchmarks record it beside their numbers."""
    arch = platform.machine()
    model, flags = cpu_info()[0], cpu_flags(arch)
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    precision, why = fast_precision("cuda" if cuda else "cpu", flags, arch)
    out: dict[str, Any] = {
        "cpu": model or platform.processor() or arch,
        "arch": arch,
        "cores": os.cpu_count(),
        "cpu_flags": sorted(flags),
        "native_bf16": native_bf16(flags, arch),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda,
        "suggested_precision": precision,
        "why": why,
    }
    if measure:
        out["cpu_matmul_gflops"] = {
            "fp32": round(matmul_rate(torch.float32, 1024), 1),
            # 512: an emulated bf16 matmul of 1024 takes seconds
            "bf16": round(matmul_rate(torch.bfloat16, 512), 1),
        }
    return out
