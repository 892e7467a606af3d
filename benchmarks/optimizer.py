"""Adam's step on the CelebA-64 VAE's parameters: for-loop vs foreach vs fused (run by hand).

The measurement behind train.fused_adam's default. Median of 20 steps after 3 of warm-up, on
random gradients (the step's cost does not depend on their values).

    python benchmarks/optimizer.py [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from vaelab import models

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import machine, run_config, synchronize, write_record  # noqa: E402

IMPLEMENTATIONS = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(HERE / "results" / "optimizer.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {}
    for name, options in IMPLEMENTATIONS.items():
        torch.manual_seed(0)
        model = models.build(run_config("celeba64", []).model, (3, 64, 64)).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **options)
        times = []
        for i in range(23):
            synchronize(device)
            t = time.perf_counter()
            opt.step()
            synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - t)
        results[name] = round(1e3 * statistics.median(times), 3)
        print(f"Adam {name}: {results[name]} ms per step")
    n = sum(p.numel() for p in model.parameters())
    record = {"machine": machine(device), "parameters": n, "ms_per_step": results}
    write_record(args.out, record)


if __name__ == "__main__":
    main()
