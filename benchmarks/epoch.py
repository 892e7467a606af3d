"""One full training epoch of the CelebA-64 configuration, end to end (run by hand, not a test).

The data are synthetic uint8 images of CelebA's split sizes (162,770 train, 19,867 val) held in
memory, as the preprocessing cache holds them; the run is the shipped celeba_vae config (batch 144)
with train.epochs=1, through ``vaelab.train`` itself: batches, training, validation, metrics
and the checkpoint are all inside the time, so the number is the one a user waits for.

    python benchmarks/epoch.py [--device cpu|cuda] [--precision fp32|bf16] [--channels-last]
        [--compile] [--train-images 162770] [--out FILE]

--train-images scales the epoch down (e.g. on a 2-core CPU); the rate and the projected time
for the full 162,770 images are reported beside the measured time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import vaelab
from vaelab.checkpoint import read_metrics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import machine, run_config, synthetic_splits, write_record  # noqa: E402

CELEBA_TRAIN, CELEBA_VAL = 162_770, 19_867


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--train-images", type=int, default=CELEBA_TRAIN)
    parser.add_argument("--epochs", type=int, default=1, help="each epoch's time is reported")
    parser.add_argument("--val-images", type=int, default=None, help="default: in proportion")
    parser.add_argument("--out", default=None, help="result file (.json; .jsonl appends)")
    args = parser.parse_args()
    n_val = args.val_images or round(args.train_images * CELEBA_VAL / CELEBA_TRAIN)

    t = time.perf_counter()
    splits = synthetic_splits((3, 64, 64), args.train_images, n_val)
    made = time.perf_counter() - t
    cfg = run_config(
        "celeba64",
        [
            f"train.epochs={args.epochs}",
            f"train.compile={str(args.compile).lower()}",
            f"train.device={args.device}",
            f"train.precision={args.precision}",
            f"train.channels_last={str(args.channels_last).lower()}",
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        vaelab.train(cfg, run, splits=splits)
        seconds = time.perf_counter() - t
        rows = read_metrics(run)
        checkpoint_mb = sum(f.stat().st_size for f in run.rglob("*.safetensors")) / 1e6
    # Each epoch's training and validation time, from the trainer's cumulative clock.
    ends = [0.0] + [r["seconds"] for r in rows if r["split"] == "val"]
    per_epoch = [round(b - a, 2) for a, b in itertools.pairwise(ends)]
    rate = args.train_images * args.epochs / seconds
    label = args.precision + ("+channels_last" if args.channels_last else "")
    label += "+compile" if args.compile else ""
    record = {
        "machine": machine(torch.device(args.device)),
        "path": label,
        "train_images": args.train_images,
        "val_images": n_val,
        "batch": cfg.train.batch_size,
        "epochs": args.epochs,
        "seconds": round(seconds, 2),
        "epoch_seconds_each": per_epoch,  # training + validation, per epoch
        "first_train_loop_seconds": rows[0]["seconds"],  # the trainer's clock (metrics.jsonl)
        "first_validation_seconds": round(rows[1]["seconds"] - rows[0]["seconds"], 2),
        "setup_and_checkpoint_seconds": round(seconds - rows[-1]["seconds"], 2),
        "images_per_s": round(rate, 1),
        "projected_celeba_epoch_seconds": round(
            seconds / args.epochs * CELEBA_TRAIN / args.train_images, 1
        ),
        "val_elbo_nats": rows[-1]["elbo_nats"],
        "checkpoint_mb": round(checkpoint_mb, 1),
        "data_synthesis_seconds": round(made, 1),
    }
    print(
        f"{args.epochs} epoch(s) ({label}, {args.device}): {args.train_images} train + {n_val} "
        f"val images each, {seconds:.1f} s in all, set-up and checkpoints included "
        f"({rate:.0f} train images/s); each epoch's training + validation: {per_epoch} s"
    )
    print(json.dumps(record))
    if args.out:
        write_record(args.out, record)


if __name__ == "__main__":
    main()
