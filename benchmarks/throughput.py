"""Training and evaluation throughput of vaelab beside the peers' loops (run by hand, not a test).

For each network (the CelebA-64 conv VAE of the shipped celeba_vae config, the default MNIST
conv VAE) and batch size, the same network is trained:
- the way the peers do it: a plain fp32 NCHW PyTorch loop as in AntixK/PyTorch-VAE and pythae
  (torch.optim.Adam with its default implementation, loss.item() after every step); and the
  same loop in a process with vaelab's CPU memory cache (train.cpu_memory_cache), to show what
  that process setting alone is worth;
- by pythae's own ``VAE`` (benchmarks/peers.py), when pythae is installed (CPU only);
- by vaelab's own training step (``vaelab.trainer.train_step``, as the trainer calls it, batches
  gathered from a uint8 dataset), in each of the trainer's fast paths.
Each contender runs in a process of its own, as a user runs one trainer, so what one sets in its
process reaches no other; the processes start side by side, then warm up and are timed one at a
time. Reported: training
images/s (forward + loss + backward + optimizer step), evaluation images/s
(vaelab: ``vaelab.trainer.validate``; peer: an eval-mode forward), forward FLOPs per image
(torch.utils.flop_counter), achieved GFLOP/s (3 x forward per training image) and its share of
the matmul peak measured in the same run, and the ratio to each peer (the median of the ratios
within each repetition). Every rate is the median of --reps repetitions after warm-up. On a
CPU, the run refuses to report when other processes used more than 10% of the CPUs meanwhile
(--force reports anyway, marked).

    python benchmarks/throughput.py [--device cpu|cuda] [--nets celeba64 mnist]
        [--batches 64 144] [--reps 5] [--min-seconds 1] [--compile] [--fp32-only] [--emulated]
        [--out FILE]

The results file (default benchmarks/results/CLASS/throughput.json, CLASS the machine's: avx2,
avx512, avx512_bf16, amx, arm, arm_bf16 or the GPU's name) records the hardware facts of
`vaelab env`. On a CPU that emulates bf16 the bf16 paths are skipped unless --emulated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import vaelab
import vaelab.machine
from vaelab import models, speed, trainer
from vaelab.data import ImageDataset, Splits
from vaelab.data.base import batch_source

HERE = Path(__file__).resolve().parent
NETS = {  # name -> (image shape, shipped config name or None for the defaults)
    "celeba64": ((3, 64, 64), "celeba_vae"),
    "mnist": ((1, 28, 28), None),
}
# vaelab's paths: (label, overrides of the train section)
PATHS = [
    ("fp32", ["train.channels_last=false"]),
    ("fp32+channels_last", ["train.channels_last=true"]),
    ("bf16", ["train.precision=bf16", "train.channels_last=false"]),
    ("bf16+channels_last", ["train.precision=bf16", "train.channels_last=true"]),
]
COMPILED = ("bf16+channels_last+compile", [*PATHS[3][1], "train.compile=true"])
# fp16 (with its gradient scaler) only on GPUs: most CPUs have no fast fp16 arithmetic.
CUDA_PATHS = [("fp16+channels_last (grad scaler)", ["train.precision=fp16"])]
WORKER_TIMEOUT = 1800  # seconds a worker may take to answer (a compile, a slow repetition)


# -- the machine ------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, reps: int = 5) -> float:
    """The best GFLOP/s of square matmuls (several sizes, median of ``reps`` each)."""
    best = 0.0
    for n in (2048, 4096) if device.type == "cpu" else (8192,):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        times = []
        for _ in range(reps):
            synchronize(device)
            t = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


class CpuWatch:
    """CPU time used by other processes while a benchmark runs (Linux /proc/stat)."""

    def __init__(self) -> None:
        self.busy0, self.own0, self.wall0 = self._busy(), self._own(), time.time()

    @staticmethod
    def _own() -> float:
        """CPU time of this process and of its children that have ended (the workers, and
        what they ran: torch.compile's compiler processes)."""
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    @staticmethod
    def _busy() -> float:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return float("nan")
        ticks = [int(f) for f in fields]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def others_share(self) -> float:
        """Share of all CPUs' time used by other processes since this object was made."""
        busy = self._busy() - self.busy0
        own = self._own() - self.own0
        wall = time.time() - self.wall0
        return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


# -- data and networks ------------------------------------------------------------------------


def synthetic_splits(shape: tuple[int, int, int], n_train: int, n_val: int) -> Splits:
    """uint8 noise images in memory, as a data cache holds them: the speed of the networks
    does not depend on what the pictures show."""
    c, h, w = shape
    images = np.random.default_rng(0).integers(0, 256, (n_train + n_val, h, w, c), np.uint8)
    everything = ImageDataset(images)
    return Splits(
        everything.subset(np.arange(n_train)),
        everything.subset(np.arange(n_train, n_train + n_val)),
    )


def run_config(net: str, overrides: list[str]) -> vaelab.RunConfig:
    # allow_emulated: a benchmark measures the precision it is asked for, emulated or not
    extra = ["train.progress=false", "train.allow_emulated=true"]
    return vaelab.load_config(NETS[net][1], [*overrides, *extra])


def forward_flops(net: str) -> float:
    shape = NETS[net][0]
    model = models.build(run_config(net, []).model, shape)
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(8, *shape))
    return counter.get_total_flops() / 8


@dataclass
class Contender:
    """One way of training the network: a step to time, and optionally an evaluation pass."""

    name: str
    step: Callable[[], None]
    step_images: int
    evaluate: Callable[[], None] | None = None
    eval_images: int = 0
    session: Any = None  # vaelab's: the trainer's session (model, optimizer), for layer_times.py


def _rate(fn: Callable[[], None], calls: int, images: int, device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return images * calls / (time.perf_counter() - t)


def _serve(conn: Connection, make: str, args: tuple, min_seconds: float, steps: int) -> None:
    """A worker process: build one contender, then (when asked: one worker at a time) warm it
    up and time it whenever the parent asks."""
    contender = globals()[make](*args)
    conn.send(None if contender is None else contender.name)
    if contender is None:
        return
    device = torch.device(args[2])  # every maker takes (net, batch, device, ...)
    kinds = {"train": (contender.step, contender.step_images)}
    if contender.evaluate is not None:
        kinds["eval"] = (contender.evaluate, contender.eval_images)
    conn.recv()  # "warm"
    calls = {}
    for kind, (fn, images) in kinds.items():
        t = time.perf_counter()
        fn()  # the first call (with train.compile, the compilation)
        synchronize(device)
        if kind == "train" and "compile" in contender.name:
            print(f"  ({contender.name}: the first step {time.perf_counter() - t:.1f} s)")
        # Warm up for at least min_seconds: the first steps of a process run slower.
        t, n = time.perf_counter(), 0
        while n < steps or time.perf_counter() - t < min_seconds:
            fn()
            n += 1
        once = images / _rate(fn, 1, images, device)
        calls[kind] = max(steps, math.ceil(min_seconds / once))
    conn.send(list(kinds))
    while (request := conn.recv()) != "stop":
        fn, images = kinds[request]
        conn.send(_rate(fn, calls[request], images, device))
    conn.send("stopped")


@dataclass
class Worker:
    """One contender in a process of its own, as a user runs one trainer: nothing one sets in
    its process (vaelab's CPU memory cache, torch.compile's state) reaches the others. The
    workers start (import torch, build the model) side by side; then each warms up and is timed
    in turn: only one computes at a time, the others wait on their pipe."""

    job: str
    conn: Connection
    process: mp.process.BaseProcess
    name: str = ""
    kinds: list[str] = field(default_factory=list)
    train: list[float] = field(default_factory=list)  # images/s, one per repetition
    eval: list[float] = field(default_factory=list)

    @classmethod
    def launch(cls, make: str, args: tuple, cli: argparse.Namespace) -> Worker:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, make, args, cli.min_seconds, cli.steps))
        process.start()
        return cls(f"{make}{args}", conn, process)

    def _receive(self) -> Any:
        try:
            if not self.conn.poll(WORKER_TIMEOUT):
                sys.exit(f"throughput.py: the worker for {self.job} gave no answer in "
                         f"{WORKER_TIMEOUT} s")  # fmt: skip
            return self.conn.recv()
        except EOFError:
            sys.exit(f"throughput.py: the worker for {self.job} failed (see above)")

    def built(self) -> bool:
        """Wait for the worker's contender; False if it has none (pythae not installed)."""
        self.name = self._receive()
        if self.name is None:
            self.process.join()
        return self.name is not None

    def warm(self) -> None:
        self.conn.send("warm")
        self.kinds = self._receive()

    def time(self, kind: str) -> float:
        self.conn.send(kind)
        return self._receive()

    def stop(self) -> None:
        self.conn.send("stop")
        self._receive()
        self.process.join()


@contextlib.contextmanager
def launched(jobs: list[tuple[str, tuple]], cli: argparse.Namespace) -> Iterator[list[Worker]]:
    """The workers of ``jobs`` that have a contender, warmed up; none is left running after."""
    workers = [Worker.launch(make, a, cli) for make, a in jobs]
    try:
        ready = [w for w in workers if w.built()]
        for w in ready:
            w.warm()
        yield ready
    finally:
        for w in workers:
            if w.process.is_alive():
                w.process.terminate()
            w.process.join()  # so that its CPU time is counted


def measure(workers: list[Worker], reps: int) -> None:
    """Time the contenders in turn, repetition by repetition, so that a drift of the machine's
    speed hits all of them alike; each repetition lasts at least --min-seconds (and --steps
    steps), and each starts with the next contender in turn; a first round is not counted."""
    for kind in ("train", "eval"):
        for w in workers:  # one round untimed: a worker's first repetition after the others'
            if kind in w.kinds:  # warm-ups ran slow (the plain loop's: 97 against 150-176)
                w.time(kind)
        for rep in range(reps):
            # Each repetition starts with another contender: none is always timed first.
            for w in workers[rep % len(workers) :] + workers[: rep % len(workers)]:
                if kind in w.kinds:
                    getattr(w, kind).append(w.time(kind))
    for w in workers:
        w.stop()


# The process-wide settings of vaelab's contenders (threads, memory cache), held to the end.
SETTINGS = contextlib.ExitStack()


# -- the peers' loop and vaelab's step --------------------------------------------------------


def plain_loop(net: str, batch: int, device: str, memory_cache: bool = False) -> Contender:
    """The same network trained as in PyTorch-VAE and pythae: fp32, NCHW, default Adam, the
    loss read after every step. ``memory_cache``: in a process with vaelab's CPU memory cache
    (``train.cpu_memory_cache``), to show what that setting alone is worth."""
    name = "peer: plain fp32 loop"
    if memory_cache:
        speed.cache_cpu_memory()
        name = "peer: plain loop + memory cache"
    torch.manual_seed(0)
    model = models.build(run_config(net, []).model, NETS[net][0]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, *NETS[net][0], device=device)

    def step() -> None:
        model.train()
        loss = model(x).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(x).loss.sum().item()

    return Contender(name, step, batch, evaluate, batch)


def pythae(net: str, batch: int, device: str) -> Contender | None:
    try:
        from peers import pythae_step
    except ImportError:
        return None
    cfg = run_config(net, []).model
    step = pythae_step(NETS[net][0], tuple(cfg.widths), cfg.latent_dim, batch)
    return None if step is None else Contender("peer: pythae VAE", step, batch)


def vaelab_contender(
    net: str, batch: int, device_name: str, label: str, overrides: list[str]
) -> Contender:
    """vaelab's training step as ``vaelab.trainer.fit`` runs it: indices -> uint8 gather ->
    float batch (-> channels-last) -> ``train_step`` (autocast, fused Adam, no host sync); and
    ``validate`` on a validation set of 4 batches. The process settings (``speed``) stay on for
    the rest of the benchmark, as they are for a whole training run."""
    device = torch.device(device_name)
    cfg = run_config(net, [*overrides, f"train.device={device.type}", f"train.batch_size={batch}"])
    splits = synthetic_splits(NETS[net][0], 8 * batch, 4 * batch)
    SETTINGS.enter_context(speed.process_settings(cfg.train))
    session = trainer.setup(cfg, splits)
    source = batch_source(splits.train, device)
    order = torch.randperm(len(splits.train)).view(-1, batch)
    if device.type == "cuda":
        order = order.to(device)
    counter = iter(range(10**9))

    def step() -> None:
        i = next(counter)
        x = source.batch(order[i % len(order)], device)
        trainer.train_step(session, speed.inputs(x, cfg.train), session.context(i, 1), 10**9)

    def evaluate() -> None:
        trainer.validate(session, 1, 0)

    return Contender(f"vaelab {label}", step, batch, evaluate, len(splits.val), session)


# -- the table ---------------------------------------------------------------------------------


@contextlib.contextmanager
def watched(force: bool, device: torch.device) -> Iterator[CpuWatch]:
    watch = CpuWatch()
    yield watch
    share = watch.others_share()
    # On a GPU the CPU only launches work (and torch.compile's worker processes count as
    # "other processes"): the share is recorded, not enforced.
    if share > 0.10 and device.type == "cpu":
        message = (
            f"other processes used {100 * share:.0f}% of the CPUs during the measurement "
            "(limit 10%): numbers not reported; rerun on an idle machine or pass --force"
        )
        if not force:
            sys.exit(f"throughput.py: {message}")
        print(f"WARNING: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 144])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="least steps per repetition")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="least time per rep")
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    parser.add_argument("--compile-batches", nargs="+", type=int, default=[144])
    parser.add_argument("--no-pythae", action="store_true", help="skip pythae even if installed")
    parser.add_argument(
        "--fp32-only", action="store_true", help="skip the bf16 paths and the bf16 matmul peak"
    )
    parser.add_argument(
        "--emulated",
        action="store_true",
        help="time the bf16 paths even on a CPU that emulates bf16 (by default they are skipped "
        "there: 10-16x slower than fp32, the bf16 rows alone take tens of minutes)",
    )
    parser.add_argument("--force", action="store_true", help="report even on a busy CPU")
    parser.add_argument("--out", help="default: benchmarks/results/CLASS/throughput.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.reps < 5 and not args.force:
        parser.error("--reps: at least 5 repetitions for a reported median (or --force)")
    facts = machine(device)
    if device.type == "cpu" and not facts["native_bf16"] and not args.emulated:
        print("this CPU emulates bf16 (vaelab env): the bf16 paths are skipped (--emulated)")
        args.fp32_only = True
    args.out = args.out or str(HERE / "results" / hardware_class(facts) / "throughput.json")

    with watched(args.force, device) as watch:
        peak = {"fp32": matmul_peak(torch.float32, device)}
        peak["bf16"] = math.nan if args.fp32_only else matmul_peak(torch.bfloat16, device)
        print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
        rows = []
        for net in args.nets:
            flops = forward_flops(net)
            for batch in args.batches:
                print(f"{net}, batch {batch}: building and warming up ...", flush=True)
                dev = device.type
                jobs = [("plain_loop", (net, batch, dev))]
                if device.type == "cpu":  # the memory cache is a CPU setting
                    jobs.append(("plain_loop", (net, batch, dev, True)))
                    if not args.no_pythae:
                        jobs.append(("pythae", (net, batch, dev)))
                paths = PATHS + (CUDA_PATHS if device.type == "cuda" else [])
                if args.fp32_only:
                    paths = [p for p in paths if "bf16" not in p[0]]
                if args.compile and batch in args.compile_batches:
                    paths = [*paths, COMPILED]
                jobs += [("vaelab_contender", (net, batch, dev, *p)) for p in paths]
                with launched(jobs, args) as workers:
                    if any(make == "pythae" for make, _ in jobs) and not any(
                        w.name.endswith("pythae VAE") for w in workers
                    ):
                        print("  peer: pythae VAE: not installed (pip install 'vaelab[bench]')")
                    measure(workers, args.reps)
                rows += table_rows(net, batch, flops, peak, workers)
                print_rows(rows[-len(workers) :])
        others = watch.others_share()
    record = {
        "machine": facts,
        "matmul_peak_gflops": {
            k: round(v, 1) if math.isfinite(v) else None for k, v in peak.items()
        },
        "other_processes_cpu_share": round(others, 3),
        "reps": args.reps,
        "steps_per_rep": args.steps,
        "rows": rows,
    }
    print("\nAll rows:")
    print_rows(rows)
    write_record(args.out, record)
    print(f"written: {args.out}")


def table_rows(
    net: str, batch: int, flops: float, peak: dict[str, float], contenders: list[Worker]
) -> list[dict]:
    def median(c: Worker) -> float:
        return statistics.median(c.train)

    def paired(c: Worker, peer: Worker | None) -> float | None:
        """The median over repetitions of the ratio to ``peer`` timed in the same repetition:
        steadier than a ratio of medians when the machine's speed drifts."""
        if peer is None or not peer.train:
            return None
        return statistics.median(a / b for a, b in zip(c.train, peer.train, strict=True))

    plain = contenders[0]
    pythae_peer = next((c for c in contenders if c.name.endswith("pythae VAE")), None)
    rows = []
    for c in contenders:
        rate = median(c)
        # The half-precision peak for bf16 and fp16 paths (they use the same units).
        precision = "bf16" if "bf16" in c.name or "fp16" in c.name else "fp32"
        gflops = rate * 3 * flops / 1e9
        rows.append(
            {
                "net": net,
                "batch": batch,
                "path": c.name,
                "train_images_per_s": round(rate, 1),
                "train_reps": [round(r, 1) for r in c.train],
                "eval_images_per_s": round(statistics.median(c.eval), 1) if c.eval else None,
                "forward_mflops_per_image": round(flops / 1e6, 1),
                "achieved_gflops": round(gflops, 1),
                "share_of_peak": round(gflops / peak[precision], 3),
                "peak_used": precision,
                "x_plain_loop": round(paired(c, plain) or 0.0, 2),
                "x_pythae": None if (x := paired(c, pythae_peer)) is None else round(x, 2),
            }
        )
    return rows


def print_rows(rows: list[dict]) -> None:
    head = (
        f"{'net':<9}{'batch':>6}  {'path':<34}{'train img/s':>12}{'eval img/s':>11}"
        f"{'GFLOP/s':>9}{'% peak':>8}{'x plain':>8}{'x pythae':>9}"
    )
    print(head)
    for r in rows:
        ev = "-" if r["eval_images_per_s"] is None else f"{r['eval_images_per_s']:.0f}"
        xp = "-" if r["x_pythae"] is None else f"{r['x_pythae']:.2f}"
        print(
            f"{r['net']:<9}{r['batch']:>6}  {r['path']:<34}{r['train_images_per_s']:>12.1f}"
            f"{ev:>11}{r['achieved_gflops']:>9.1f}"
            f"{100 * r['share_of_peak']:>6.1f}{r['peak_used'][:2]:>2}"
            f"{r['x_plain_loop']:>8.2f}{xp:>9}"
        )


def write_record(out: str | Path, record: dict) -> None:
    """A benchmark's result: the JSON file ``out``, or one more line of it if it is .jsonl."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    else:
        out.write_text(json.dumps(record, indent=2) + "\n")


def hardware_class(facts: dict) -> str:
    """The results folder of a machine: its GPU, or its CPU class (what decides the speed)."""
    if facts.get("gpu"):
        return facts["gpu"].split()[-1].lower()  # "NVIDIA H200" -> h200
    flags = set(facts["cpu_flags"])
    if facts["arch"] in ("aarch64", "arm64"):
        return "arm_bf16" if facts["native_bf16"] else "arm"
    if facts["native_bf16"]:
        return "amx" if flags & {"amx_tile", "amx_bf16"} else "avx512_bf16"
    return "avx512" if "avx512f" in flags else "avx2"


def machine(device: torch.device) -> dict:
    """The hardware facts of ``vaelab env`` (CPU model and flags, torch's capability, the
    precision to use), recorded in every results file so a table keeps the hardware it came
    from; plus the GPU when one is used."""
    info = vaelab.machine.facts(measure=False)
    info["threads"] = info["torch_threads"]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


if __name__ == "__main__":
    main()
