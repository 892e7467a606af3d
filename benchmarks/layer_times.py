"""Where a training step's time goes, layer by layer (run by hand, not a test).

vaelab's training step (as benchmarks/throughput.py times it) with a clock around each leaf
layer's forward (module hooks) and its autograd node's backward (node hooks), and around the
optimizer step. torch.profiler's per-operator times are inflated for memory-bound operators
(a batch norm over a 64x64x32 activation: 5.4 ms under the profiler, 2.4 ms here), so this is
the table to read before optimising one. The backward of a layer whose output passes through a
view (the few-pixel matrix products of nets/fast.py) is not caught by its node hook and counts
in "other".

    python benchmarks/layer_times.py [--net celeba64] [--batch 64] [--steps 30]
        [--set train.precision=bf16 ...]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import NETS, vaelab_contender  # noqa: E402


def clock_layers(model: nn.Module, totals: dict[str, float]) -> None:
    """Add each leaf layer's forward and backward seconds to ``totals`` at every call."""
    started: dict[str, float] = {}

    for name, layer in model.named_modules():
        if any(True for _ in layer.children()):
            continue

        def before(_layer: nn.Module, _inputs: object, name: str = name) -> None:
            started[name] = time.perf_counter()

        def after(_layer: nn.Module, _inputs: object, out: object, name: str = name) -> None:
            totals[f"{name} forward"] += time.perf_counter() - started[name]
            node = out.grad_fn if isinstance(out, torch.Tensor) else None
            if node is None:
                return

            def begin(_grads: object) -> None:
                started[name + " backward"] = time.perf_counter()

            def end(_inputs: object, _grads: object) -> None:
                totals[f"{name} backward"] += time.perf_counter() - started[name + " backward"]

            node.register_prehook(begin)
            node.register_hook(end)

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="celeba64", choices=sorted(NETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument(
        "--set",
        nargs="*",
        default=["train.precision=bf16", "train.channels_last=true"],
        help="config overrides of the timed step",
    )
    args = parser.parse_args()
    contender = vaelab_contender(args.net, args.batch, "cpu", "timed", args.set)
    session = contender.session
    totals: dict[str, float] = collections.defaultdict(float)
    clock_layers(session.model, totals)
    step = session.optimizer.step

    def clocked_step(*a: object, **k: object) -> object:
        t = time.perf_counter()
        out = step(*a, **k)
        totals["optimizer step"] += time.perf_counter() - t
        return out

    session.optimizer.step = clocked_step  # type: ignore[method-assign]
    for _ in range(10):  # warm-up
        contender.step()
    totals.clear()
    t = time.perf_counter()
    for _ in range(args.steps):
        contender.step()
    per_step = (time.perf_counter() - t) / args.steps * 1e3
    rows = sorted(((v / args.steps * 1e3, k) for k, v in totals.items()), reverse=True)
    print(f"{args.net}, batch {args.batch}, {' '.join(args.set)}: {per_step:.1f} ms per step")
    for ms, name in rows[: args.rows]:
        print(f"{ms:7.2f} ms  {name}")
    clocked = sum(ms for ms, _ in rows)
    print(
        f"{clocked:7.1f} ms  in the rows above and below the cut; other {per_step - clocked:.1f} ms"
    )


if __name__ == "__main__":
    main()
