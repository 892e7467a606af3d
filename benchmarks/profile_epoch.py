"""Where an epoch's time goes: vaelab.train under torch.profiler (run by hand, not a test).

A short epoch of the CelebA-64 configuration (synthetic uint8 images, as benchmarks/epoch.py)
is profiled; the tables of the most expensive operators by device time and by host time are
printed, and the trace is saved for chrome://tracing or Perfetto.

    python benchmarks/profile_epoch.py [--device cpu|cuda] [--train-images 14400]
        [--precision fp32] [--channels-last] [--trace FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vaelab

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import run_config, synthetic_splits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--train-images", type=int, default=14_400)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--trace", default=None, help="write a Chrome trace (JSON) here")
    args = parser.parse_args()
    splits = synthetic_splits((3, 64, 64), args.train_images, args.train_images // 8)
    cfg = run_config(
        "celeba64",
        [
            "train.epochs=1",
            f"train.device={args.device}",
            f"train.precision={args.precision}",
            f"train.channels_last={str(args.channels_last).lower()}",
        ],
    )
    activities = [ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.zeros(1, device="cuda")  # the CUDA context, outside the profile
    with tempfile.TemporaryDirectory() as tmp, profile(activities=activities) as prof:
        t = time.perf_counter()
        vaelab.train(cfg, Path(tmp) / "run", splits=splits)
        seconds = time.perf_counter() - t
    print(f"epoch of {args.train_images} images: {seconds:.2f} s (under the profiler)")
    table = prof.key_averages()
    if args.device == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
