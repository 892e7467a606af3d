"""Interleaved A/B of vaelab's training step between two source trees (run by hand, not a test).

Two processes, each importing vaelab from its own tree (e.g. a clone of an older commit and this
checkout), take turns running --steps steps of the CelebA-64 VAE of the shipped celeba_vae config
(fp32 and the default speed options, synthetic uint8 images, batch --batch); each round's ratio
B/A of images per second is printed, then the median. Taking turns cancels the drift of a shared
machine, which two benchmark runs minutes apart do not. Works with trees from before issue 14
(``vaelab.train._session``/``_step``) and after it (``vaelab.trainer.setup``/``train_step``).

    python benchmarks/ab_trainer.py A_SRC B_SRC [--rounds 10] [--steps 10] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = r"""
import importlib, sys, time
import numpy as np, torch
from vaelab.config import load_config
from vaelab.data import ImageDataset, Splits
from vaelab.data.base import batch_source

batch = int(sys.argv[1])
over = ["model.widths=[32,64,128,256,512]", "model.latent_dim=128", "data.size=64",
        "data.channels=3", f"train.batch_size={batch}", "train.progress=false"]
cfg = load_config(overrides=over)
images = np.random.default_rng(0).integers(0, 256, (8 * batch, 64, 64, 3), dtype=np.uint8)
splits = Splits(train=ImageDataset(images), val=ImageDataset(images[:batch]))
try:
    from vaelab import speed, trainer  # after issue 14
    speed.process_settings(cfg.train).__enter__()
    session = trainer.setup(cfg, splits)
    def step(i, x):
        trainer.train_step(session, speed.inputs(x, cfg.train), session.context(i, 1), 10**9)
except ImportError:  # before: the trainer was vaelab/train.py, its step private
    trainer = importlib.import_module("vaelab.train")
    session = trainer._session(cfg, splits)
    def step(i, x):
        trainer._step(session, x.contiguous(memory_format=torch.channels_last), i, 10**9)
source = batch_source(splits.train, torch.device("cpu"))
order = torch.randperm(8 * batch).view(8, batch)
i = 0
for _ in range(5):  # warm-up
    step(i, source.batch(order[i % 8], "cpu")); i += 1
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    for _ in range(int(line)):
        step(i, source.batch(order[i % 8], "cpu")); i += 1
    print(time.perf_counter() - start, flush=True)
"""


def start(src: str, batch: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(batch)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a_src")
    parser.add_argument("b_src")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    procs = {"A": start(args.a_src, args.batch), "B": start(args.b_src, args.batch)}
    rates: dict[str, list[float]] = {"A": [], "B": []}
    ratios = []
    for r in range(args.rounds):
        for k in ("A", "B") if r % 2 == 0 else ("B", "A"):  # who goes first alternates
            procs[k].stdin.write(f"{args.steps}\n")  # type: ignore[union-attr]
            procs[k].stdin.flush()  # type: ignore[union-attr]
            seconds = float(procs[k].stdout.readline())  # type: ignore[union-attr]
            rates[k].append(args.steps * args.batch / seconds)
        ratios.append(rates["B"][-1] / rates["A"][-1])
        print(f"round {r}: A {rates['A'][-1]:.1f} img/s, B {rates['B'][-1]:.1f} img/s, "
              f"B/A {ratios[-1]:.3f}", flush=True)  # fmt: skip
    a, b = statistics.median(rates["A"]), statistics.median(rates["B"])
    spread = f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    print(
        f"median img/s: A {a:.1f}, B {b:.1f}; median B/A {statistics.median(ratios):.3f} ({spread})"
    )
    for proc in procs.values():
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()


if __name__ == "__main__":
    main()
