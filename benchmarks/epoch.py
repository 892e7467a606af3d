"""One full training epoch of the CelebA-64 configuration, end to end (run by hand, not a test).

The data are synthetic uint8 images of CelebA's split sizes (162,770 train, 19,867 val) held in
memory, as the preprocessing cache holds them; the run is the shipped celeba_vae config (batch 144)
with train.epochs=1, through ``vaelab.train`` itself: batches, training, validation, metrics
and the checkpoint are all inside the time, so the number is the one a user waits for.

    python benchmarks/epoch.py [--device cpu|cuda] [--precision fp32|bf16] [--channels-last]
        [--compile] [--train-images 162770] [--out FILE]

--train-images scales the epoch down (e.g. on a 2-core CPU); the rate and the projected time
for the full 162,770 images are reported beside the measured time.

With --compare, whole epochs of several contenders on the same data, each in a fresh process
of its own (the memory cache is a setting of the process), taking turns round by round:

    python benchmarks/epoch.py --compare plain default train.channels_last=false ...
        [--batch 64] [--train-images 4560] [--rounds 3] [--out FILE]

"plain" is the peers' plain fp32 loop (PyTorch-VAE, pythae): NCHW, torch.optim.Adam with its
default implementation, the loss read after every step, a validation pass in eval mode and a
torch.save checkpoint each epoch, batches gathered from the same uint8 images in memory.
"default" is `vaelab.train` with the shipped celeba_vae config as it is (at --batch); any other
contender is that run with its comma-separated key=value overrides. Each contender's time is
the whole epoch (batches, training, validation, checkpoint), without process start-up and data
synthesis; "x plain" is the median over rounds of plain's time / the contender's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vaelab
from vaelab import models
from vaelab.checkpoint import read_metrics
from vaelab.data import Splits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import machine, run_config, synthetic_splits, write_record  # noqa: E402

CELEBA_TRAIN, CELEBA_VAL = 162_770, 19_867


def plain_epochs(splits: Splits, batch: int, epochs: int, folder: Path) -> float:
    """Seconds for ``epochs`` epochs of the peers' plain fp32 loop: shuffled batches of uint8
    images made float, forward, mean loss, backward, Adam (default implementation), the loss
    read each step; then the validation split in eval mode and a checkpoint, every epoch.
    Timed like `vaelab.train`: from building the model to the last checkpoint. Batches are
    NCHW-contiguous, as a DataLoader collates torchvision's CHW tensors."""
    train = torch.from_numpy(splits.train.uint8(slice(None)))
    val = torch.from_numpy(splits.val.uint8(slice(None)))
    start = time.perf_counter()
    torch.manual_seed(0)
    model = models.build(run_config("celeba64", []).model, splits.train.shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train))
        for i in range(0, len(train) - batch + 1, batch):
            x = train[order[i : i + batch]].permute(0, 3, 1, 2).float().div(255).contiguous()
            loss = model(x).loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        model.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(val), batch):
                x = val[i : i + batch].permute(0, 3, 1, 2).float().div(255).contiguous()
                total += model(x).loss.sum()
        float(total)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, folder / "ckpt.pt")
    return time.perf_counter() - start


def one_contender(args: argparse.Namespace) -> dict:
    """The --one contender's whole-epoch time in this process (a JSON line for --compare)."""
    n_val = args.val_images or round(args.train_images * CELEBA_VAL / CELEBA_TRAIN)
    splits = synthetic_splits((3, 64, 64), args.train_images, n_val)
    with tempfile.TemporaryDirectory() as tmp:
        if args.one == "plain":
            seconds = plain_epochs(splits, args.batch, args.epochs, Path(tmp))
            return {"contender": "plain", "seconds": seconds}
        overrides = [] if args.one == "default" else args.one.split(",")
        cfg = run_config(
            "celeba64",
            [
                f"train.epochs={args.epochs}",
                f"train.batch_size={args.batch}",
                "train.device=cpu",
                "train.precision=fp32",
                *overrides,
            ],
        )
        t = time.perf_counter()
        vaelab.train(cfg, Path(tmp) / "run", splits=splits)
        seconds = time.perf_counter() - t
    return {"contender": args.one, "seconds": seconds, "precision": cfg.train.precision}


def compare(args: argparse.Namespace) -> None:
    """Each contender in a fresh process, round by round, the first contender rotating."""
    times: dict[str, list[float]] = {c: [] for c in args.compare}
    names = list(args.compare)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                "--batch",
                str(args.batch),
                "--train-images",
                str(args.train_images),
                "--epochs",
                str(args.epochs),
            ]
            if args.val_images:
                cmd += ["--val-images", str(args.val_images)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{name}: failed\n{done.stderr[-2000:]}")
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            times[name].append(seconds)
            print(f"round {r + 1} {name}: {seconds:.1f} s", flush=True)
    images = args.train_images * args.epochs
    rows = []
    for name, each in times.items():
        row = {
            "contender": name,
            "seconds_each": [round(t, 2) for t in each],
            "median_seconds": round(statistics.median(each), 2),
            "train_images_per_s": round(images / statistics.median(each), 1),
        }
        if "plain" in times:
            row["x_plain"] = round(
                statistics.median(p / t for p, t in zip(times["plain"], each, strict=True)), 3
            )
        rows.append(row)
        print(
            f"{name:<40} {row['median_seconds']:>8.1f} s {row['train_images_per_s']:>7.1f} "
            f"img/s  x plain {row.get('x_plain', '-')}"
        )
    n_val = args.val_images or round(args.train_images * CELEBA_VAL / CELEBA_TRAIN)
    record = {
        "machine": machine(torch.device("cpu")),
        "batch": args.batch,
        "train_images": args.train_images,
        "val_images": n_val,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "rows": rows,
    }
    if args.out:
        write_record(args.out, record)


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
    parser.add_argument("--compare", nargs="+", help="contenders: plain, default, k=v[,k=v]")
    parser.add_argument("--batch", type=int, default=64, help="--compare's batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one contender, in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_contender(args)))
        return
    if args.compare:
        compare(args)
        return
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
