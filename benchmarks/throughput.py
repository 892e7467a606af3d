"""Training throughput of vaelab's VAE on the CelebA-64 network (run by hand, not a test).

A first version for issue 6: training images/s (forward + loss + backward + Adam step) at
batch 64 in fp32, channels-last, bf16 autocast and both; forward FLOPs per image from
torch.utils.flop_counter; the machine's matmul peak (fp32 and bf16) measured in the same run;
medians of --reps repetitions after warm-up. Not yet: the peers' own loops (pythae), batch 144,
evaluation images/s, the CPU-idle check.

    python benchmarks/throughput.py [--reps 5] [--steps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import vaelab
from vaelab import models

HERE = Path(__file__).resolve().parent


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matmul, the median of ``reps``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def train_rate(precision: str, channels_last: bool, batch: int, steps: int, reps: int) -> float:
    cfg = vaelab.load_config(HERE.parent / "configs" / "celeba_vae.yaml").model
    torch.manual_seed(0)
    model = models.build(cfg, (3, 64, 64))
    x = torch.rand(batch, 3, 64, 64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    def step() -> None:
        with cast:
            loss = model(x).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(batch * steps / (time.perf_counter() - t))
    return statistics.median(rates)


def forward_flops() -> float:
    cfg = vaelab.load_config(HERE.parent / "configs" / "celeba_vae.yaml").model
    model = models.build(cfg, (3, 64, 64))
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(8, 3, 64, 64))
    return counter.get_total_flops() / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    args = parser.parse_args()
    flops = forward_flops()
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    results = {}
    for precision, cl in [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]:
        rate = train_rate(precision, cl, args.batch, args.steps, args.reps)
        gflops = rate * 3 * flops / 1e9  # forward + backward ~ 3 x forward
        name = precision + ("+channels_last" if cl else "")
        results[name] = {
            "train_images_per_second": round(rate, 1),
            "achieved_gflops": round(gflops, 1),
            "share_of_peak": round(gflops / peak[precision], 3),
        }
        print(f"{name:<22}{rate:8.1f} img/s  {gflops:7.1f} GFLOP/s  "
              f"{100 * gflops / peak[precision]:5.1f}% of {precision} matmul peak")  # fmt: skip
    record = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "network": "configs/celeba_vae.yaml (64x64x3, widths 32-512, latent 128)",
        "batch": args.batch,
        "forward_mflops_per_image": round(flops / 1e6, 1),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "training": results,
    }
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
