"""How well a cvae run's samples obey their condition: for each value of each variable, n
samples drawn with that value held (``vaelab sample --condition NAME=VALUE``'s path), classified
by the sample-quality classifier of the run's data (``vaelab.quality.classifier``, trained on
the training images' labels and cached), and the share classified as the value asked for.

    python benchmarks/conditional.py runs/cvae_digits [--n 200] [--figure docs/cvae.png]

Prints one line per variable (the accuracy per value and overall) and the classifier's accuracy
on real validation images, the ceiling to read them against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vaelab.checkpoint import load
from vaelab.quality import classifier, targets
from vaelab.report import pictures
from vaelab.report.draw import run_split
from vaelab.report.figures import save_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=200, help="samples per value")
    parser.add_argument(
        "--figure", help="PNG: one row of 10 samples per value of the first variable"
    )
    args = parser.parse_args()
    model = load(args.run)
    if not model.conditions:
        raise SystemExit(f"{args.run}: not a conditional run")
    train, val = run_split(args.run, "train"), run_split(args.run, "val")
    net, info = classifier(train, val)
    heads = [name for name, _, _ in targets(train)]
    print(f"classifier accuracy on val images: {info.get('val_accuracy')}")
    for i, (name, size) in enumerate(model.conditions):
        if name not in heads:
            print(f"{name}: the classifier has no head for it")
            continue
        head = heads.index(name)
        right = []
        for value in range(size):
            x = pictures.samples(model, args.n, 1.0, value, None, train, {i: value})
            with torch.no_grad():
                guess = net(x)[head].argmax(1)
            right.append((guess == value).float().mean().item())
        shown = " ".join(f"{v}:{a:.2f}" for v, a in enumerate(right))
        print(f"{name}: {sum(right) / size:.3f} of samples classified as asked ({shown})")
    if args.figure:
        name, size = model.conditions[0]
        rows = [pictures.samples(model, 10, 1.0, 0, None, train, {0: v}) for v in range(size)]
        title = f"{Path(args.run).name}: one row per {name} 0..{size - 1}, z ~ N(0, I)"
        save_grid(torch.cat(rows), args.figure, nrow=10, title=title)
        print(f"written {args.figure}")


if __name__ == "__main__":
    main()
