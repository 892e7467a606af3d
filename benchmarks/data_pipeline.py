"""Benchmark the data pipeline (run by hand, not a test).

1. Cache build rate: N synthetic 178x218 JPEGs (CelebA's size and quality) decoded, centre-cropped
   to 148 and resized to 64x64 into the uint8 cache, on all cores. Target: >= 1,500 images/s on
   2 cores.
2. Data wait: the share of a training step of the CelebA-64 VAE (widths 32-64-128-256-512, latent
   128, batch 64) spent getting the batch from the cache (slice, flip, uint8 -> float).
   Target: < 5%.

    python benchmarks/data_pipeline.py [--images 5000] [--steps 20] [--out FILE]

Writes a JSON record (machine, settings, numbers) to benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vaelab
from vaelab import data, models
from vaelab.data.synthetic import celeba_name, write_images

HERE = Path(__file__).resolve().parent


def build_rate(folder: Path, n: int, cache_dir: Path) -> dict:
    write_images(folder / "img_align_celeba", [celeba_name(i) for i in range(1, n + 1)], quality=95)
    cfg = vaelab.load_config(
        overrides=["data.name=celeba", f"data.root={folder}", f"data.cache_dir={cache_dir}"]
    ).data
    start = time.perf_counter()
    splits = data.build(cfg, progress=False)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    data.build(cfg, progress=False)  # the second time: the cache is reused
    reuse = time.perf_counter() - start
    return {
        "images": splits.info["count"],
        "build_seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 1),
        "reuse_seconds": round(reuse, 3),
        "splits": splits,
    }


def data_wait(splits: data.Splits, steps: int, batch_size: int = 64) -> dict:
    cfg = vaelab.load_config("celeba_vae").model
    model = models.build(cfg, splits.train.shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = len(splits.train)
    rng = np.random.default_rng(0)
    fetch, compute = [], []
    for i in range(steps + 3):
        idx = rng.permutation(n)[:batch_size]
        t0 = time.perf_counter()
        x = data.random_hflip(splits.train.batch(idx))
        t1 = time.perf_counter()
        loss = model(x).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        t2 = time.perf_counter()
        if i >= 3:  # warm-up steps are not counted
            fetch.append(t1 - t0)
            compute.append(t2 - t1)
    f, c = float(np.median(fetch)), float(np.median(compute))
    return {
        "batch_size": batch_size,
        "fetch_ms": round(1000 * f, 3),
        "step_ms": round(1000 * c, 1),
        "data_share_percent": round(100 * f / (f + c), 3),
        "train_images_per_second": round(batch_size / (f + c), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(HERE / "results" / "data_pipeline.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        built = build_rate(Path(tmp) / "CelebA", args.images, Path(tmp) / "cache")
        splits = built.pop("splits")
        wait = data_wait(splits, args.steps)
    record = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "cache_build": built,
        "training_data_wait": wait,
        "targets": {"images_per_second": 1500, "data_share_percent": 5},
    }
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
