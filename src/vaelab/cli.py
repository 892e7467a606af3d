"""The command line: parse, build a config, call one library function."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import NoReturn

from vaelab import gap, rundir
from vaelab.checkpoint import CheckpointError
from vaelab.config import ConfigError, load_config
from vaelab.data import DataError
from vaelab.evaluate import GAP_AIS_STEPS
from vaelab.plugins import PluginError, load_plugin
from vaelab.rundir import RunDirError
from vaelab.trainer import TrainingDiverged

# Errors that are the input's fault: one line, exit code 2. OSError: a file that cannot be read
# or written (permissions, a full disk), named by the error itself.
USAGE_ERRORS = (
    ConfigError, DataError, CheckpointError, RunDirError, PluginError, TrainingDiverged, OSError
)  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse with vaelab's one-line errors (its own print the usage first)."""

    def error(self, message: str) -> NoReturn:
        print(f"vaelab: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def count(text: str) -> int:
    """An argument that counts something: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def positive(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG] [key=value ...] -> (config file or shipped name, or None; overrides)."""
    overrides = [a for a in items if "=" in a]
    paths = [a for a in items if "=" not in a]
    if len(paths) > 1:
        raise ConfigError(
            f"expected at most one config (a file or a shipped name), got {paths}; overrides "
            "look like key=value"
        )
    return (paths[0] if paths else None), overrides


def cmd_train(args: argparse.Namespace) -> int:
    """One process, or one of torchrun's (``torchrun --nproc_per_node N -m vaelab train ...``)."""
    from vaelab import distributed
    from vaelab.trainer import resume, train

    path, overrides = _split_args(args.items)
    try:
        if args.resume:
            if path is not None:
                raise ConfigError("--resume reads the run's own config.yaml: give no config file")
            run = resume(args.resume, overrides, accept_changes=args.accept_changes)
        else:
            if args.out is None:
                raise ConfigError("vaelab train needs --out RUN (or --resume RUN)")
            if args.accept_changes:
                raise ConfigError("--accept-changes goes with --resume RUN")
            run = train(load_config(path, overrides), args.out)
    finally:
        distributed.close()
    if distributed.from_environment().is_main:
        print(f"run: {run}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vaelab.demo import DEMO_EPOCHS, DEMO_IW_SAMPLES, format_summary, run_demo

    epochs, iw_samples = args.epochs or DEMO_EPOCHS, args.iw_samples or DEMO_IW_SAMPLES
    summary = run_demo(args.out, epochs, progress=not args.quiet, iw_samples=iw_samples)
    print(format_summary(summary))
    print(f"figures in {args.out}/<model>/figures/, numbers in {Path(args.out) / 'summary.json'}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from vaelab import data

    path, overrides = _split_args(args.items)
    cfg = load_config(path, overrides)
    start = time.perf_counter()
    splits = data.build(cfg.data, progress=not args.quiet)
    seconds = time.perf_counter() - start
    info = splits.info
    n = len(splits.train) + len(splits.val) + (len(splits.test) if splits.test else 0)
    sizes = f"{len(splits.train)} train, {len(splits.val)} val"
    sizes += f", {len(splits.test)} test" if splits.test else ""
    if "cache" in info and info.get("reused"):
        print(f"{n} images ({sizes}) already prepared in {info['cache']}")
    elif "cache" in info:
        print(
            f"prepared {info['count']} images ({sizes}; {len(info['skipped'])} files skipped) "
            f"at {info['images_per_second']} images/s into {info['cache']}"
        )
    else:
        print(f"{n} images ({sizes}) read in {seconds:.1f} s (this source needs no cache)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vaelab.evaluate import evaluate, format_table

    result = evaluate(
        args.run, args.split, args.iw_samples, progress=not args.quiet, ais_steps=args.ais_steps,
        ais_chains=args.ais_chains, images=args.images, bdmc=args.bdmc,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        print(f"written to {Path(args.run) / 'eval' / (args.split + '.json')}")
    return 0


def cmd_gap(args: argparse.Namespace) -> int:
    from vaelab.checkpoint import atomic_write
    from vaelab.evaluate import gap_decomposition, gap_table
    from vaelab.report.figures import gap_png

    if args.figure is not None:  # checked before minutes of work
        rundir.check_output(args.figure, overwrite=args.overwrite)
    results = []
    for run in args.runs:
        result = gap_decomposition(
            run, args.split, args.images, progress=not args.quiet, ais_steps=args.ais_steps,
            ais_chains=args.ais_chains, iw_samples=args.iw_samples,
            q_star_steps=args.q_star_steps,
        )  # fmt: skip
        results.append((Path(run).name or str(run), result))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(gap_table(result))
            print(f"written to {Path(run) / 'eval' / f'gap_{args.split}.json'}")
    if args.figure is not None:
        with_q = [(name, r) for name, r in results if "elbo_q" in r]
        if not with_q:
            raise ConfigError("--figure: no run given has an encoder, so no ELBO to take apart")
        atomic_write(rundir.check_output(args.figure, overwrite=args.overwrite), gap_png(with_q))
        print(f"written {args.figure}")
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from vaelab import inception
    from vaelab.quality import quality_table, sample_quality
    from vaelab.report.draw import run_data, run_split

    weights = None  # read and hashed once for every run; a bad file is one line before any work
    if args.inception_weights is not None:
        weights = inception.open_weights(args.inception_weights)
    for run in args.runs:
        splits = run_data(run)
        result = sample_quality(
            run, splits.train, run_split(run, args.split, splits=splits), args.split, args.images,
            args.components, progress=not args.quiet, inception_weights=weights,
        )  # fmt: skip
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{Path(run).name or run}:")
            print(quality_table(result))
            print(f"written to {Path(run) / 'eval' / f'quality_{args.split}.json'}")
    return 0


def cmd_draw(args: argparse.Namespace) -> int:
    from vaelab.report import draw

    keep = {"overwrite": args.overwrite}
    if args.command == "sample":
        out = draw.draw_samples(
            args.run, args.out, args.n, args.temperature, args.seed,
            sampler=args.sampler, components=args.components, condition=args.condition, **keep,
        )  # fmt: skip
    elif args.command == "reconstruct":
        out = draw.draw_reconstructions(args.run, args.out, args.n, args.split, **keep)
    elif args.command == "interpolate":
        out = draw.draw_interpolations(args.run, args.out, args.pairs, args.steps, **keep)
    else:
        out = draw.draw_traversal(args.run, args.out, args.dims, args.steps, args.limit, **keep)
    print(f"written {out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from vaelab.evaluate import encode
    from vaelab.report.draw import run_split

    _, overrides = _split_args(args.items)
    rundir.check_output(args.out, overwrite=args.overwrite)  # before the data is read
    dataset = run_split(args.run, args.split, overrides)
    out = encode(args.run, args.out, dataset, overwrite=args.overwrite)
    print(f"written {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vaelab.evaluate import evaluate
    from vaelab.report.html import is_sweep, sweep_runs, write_report, write_sweep_report

    rundir.check_output(args.out, overwrite=args.overwrite)  # before any run is evaluated
    sweep = len(args.runs) == 1 and is_sweep(args.runs[0])
    runs = sweep_runs(args.runs[0])[1] if sweep else args.runs
    if sweep:  # a sweep in progress: report the runs that have finished an epoch
        runs = [run for run in runs if (Path(run) / rundir.WEIGHTS).is_file()]
    for run in runs:
        if not (Path(run) / rundir.EVAL / "val.json").is_file():
            evaluate(run, "val", args.iw_samples, progress=not args.quiet)
    if sweep:
        out = write_sweep_report(args.runs[0], args.out, overwrite=args.overwrite)
    else:
        out = write_report(runs, args.out, args.title, overwrite=args.overwrite)
    print(f"written {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from vaelab.sweep import run_sweep

    path, overrides = _split_args(args.items)
    runs = run_sweep(path, args.out, overrides)
    print(f"{len(runs)} runs in {args.out}; compare them with `vaelab report {args.out} --out R`")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from vaelab.machine import facts

    found = facts(measure=not args.no_measure)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    cuda = found["cuda_device"] or "none"
    print(f"cpu           {found['cpu']} ({found['arch']}, {found['cores']} cores)")
    print(f"cpu flags     {' '.join(found['cpu_flags']) or '(none of those that matter)'}")
    print(f"native bf16   {'yes' if found['native_bf16'] else 'no'} (CPU)")
    print(f"torch         {found['torch']}, CPU capability {found['torch_cpu_capability']}, "
          f"{found['torch_threads']} threads")  # fmt: skip
    print(f"cuda device   {cuda}")
    if "cpu_matmul_gflops" in found:
        rates = found["cpu_matmul_gflops"]
        print(f"cpu matmul    fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s")
    picks = found["suggested_precision"]
    print(f"precision     train.precision=auto picks {picks}: {found['why']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vaelab.config import (
        dump_yaml,
        is_shipped,
        resolve_config,
        shipped_configs,
        shipped_description,
    )

    path, overrides = _split_args(args.items)
    if args.list:
        if args.items or args.json:
            raise ConfigError("vaelab config --list takes no config, overrides or --json")
        names = shipped_configs()
        width = max(map(len, names))
        for name in names:
            print(f"{name:<{width}}  {shipped_description(name)}")
        return 0
    if path is not None and not overrides and not args.json and is_shipped(path):
        # a shipped config's file as it is, comments included, to copy and edit
        print(resolve_config(path).read_text(encoding="utf-8"), end="")
        return 0
    cfg = load_config(path, overrides)
    print(json.dumps(cfg.to_dict(), indent=2) if args.json else dump_yaml(cfg), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vaelab.serve import serve

    serve(args.runs, args.host, args.port)
    return 0


def port_number(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vaelab", description="Train, evaluate and compare variational autoencoders."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model into a run directory")
    p.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [key=value]",
        help="a YAML config file or the name of a shipped one (vaelab config --list), and/or "
        "overrides such as model.beta=4 train.epochs=3",
    )
    p.add_argument("--out", help="the run directory to create")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run")
    p.add_argument(
        "--accept-changes",
        action="store_true",
        help="with --resume: continue although config.yaml was edited or the data changed "
        "since the run began (each change is logged)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("env", help="the hardware facts that decide vaelab's speed here")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.add_argument("--no-measure", action="store_true", help="skip the matmul rates (~2 s)")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("demo", help="decoder-only, VAE and beta-VAE on the embedded MNIST digits")
    p.add_argument("--out", default="runs/demo", help="where the runs go (default: runs/demo)")
    p.add_argument("--epochs", type=count, help="epochs per model (default: the demo's)")
    p.add_argument("--iw-samples", type=count, help="K for the val evaluation (default: 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare", help="decode and cache a data set ahead of training")
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("evaluate", help="ELBO, IS log-likelihood, gap, active units, ... of a run")
    p.add_argument("run")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--iw-samples", type=count, default=1000, help="importance samples K")
    p.add_argument(
        "--ais-steps", type=count, default=0, help="also AIS log p(x) with T steps (default: no)"
    )
    p.add_argument("--ais-chains", type=count, default=16, help="AIS chains per image")
    p.add_argument("--images", type=count, help="only the first N images of the split")
    p.add_argument(
        "--bdmc", type=count, default=0, help="BDMC bounds on N images simulated from the model"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("gap", help="the ELBO gap taken apart: AIS, IW bound, ELBO(q*), ELBO(q)")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--images", type=count, help="only the first N images of the split")
    p.add_argument("--ais-steps", type=count, default=GAP_AIS_STEPS, help="AIS steps T")
    p.add_argument("--ais-chains", type=count, default=16, help="AIS chains per image")
    p.add_argument("--iw-samples", type=count, default=1000, help="importance samples K")
    p.add_argument(
        "--q-star-steps", type=count, default=gap.STEPS, help="Adam steps of q* per image"
    )
    p.add_argument("--figure", type=Path, help="also draw the runs' gaps as stacked bars (PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace --figure if it exists")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_gap)

    p = sub.add_parser(
        "quality", help="sample quality: FID and KID in a trained classifier's feature space"
    )
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--split", default="val", choices=["val", "test"], help="held-out images")
    p.add_argument("--images", type=count, help="samples and held-out images (default: the split)")
    p.add_argument("--components", type=count, default=10, help="Gaussians of the gmm sampler")
    p.add_argument(
        "--inception-weights", type=Path, metavar="PATH",
        help="also FID/KID in Inception-v3 features: your copy of pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth (never downloaded)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_quality)

    def picture(name: str, summary: str) -> argparse.ArgumentParser:
        """A command that draws one PNG of a run."""
        p = sub.add_parser(name, help=summary)
        p.add_argument("run")
        p.add_argument("--out", required=True, help="PNG file")
        overwrite_option(p)
        p.set_defaults(func=cmd_draw)
        return p

    p = picture("sample", "a grid of samples from the prior or a post-hoc sampler")
    p.add_argument("-n", type=count, default=64)
    p.add_argument("--temperature", type=positive, default=1.0, help="z ~ N(0, T^2 I)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sampler", default="prior", choices=["prior", "gmm"],
        help="prior: z ~ the model's prior (vq_vae: codes from the code prior fitted to the "
        "training codes); gmm: a Gaussian mixture fitted to the training codes (Ghosh et al. "
        "2020); fitted ones are saved in RUN/samplers/",
    )  # fmt: skip
    p.add_argument("--components", type=count, default=10, help="Gaussians of --sampler gmm")
    p.add_argument(
        "--condition", action="append", default=[], metavar="NAME=VALUE",
        help="a cvae run: hold a label (label=7, Smiling=1, shape=2; repeatable), the others "
        "drawn from the training images that have it",
    )  # fmt: skip
    p = picture("reconstruct", "real images above their reconstructions")
    p.add_argument("-n", type=count, default=32)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p = picture("interpolate", "latent interpolations between pairs of val images")
    p.add_argument("--pairs", type=count, default=6)
    p.add_argument("--steps", type=count, default=10)
    p = picture("traverse", "one row per most-active latent dimension, -3..3")
    p.add_argument("--dims", type=count, default=8)
    p.add_argument("--steps", type=count, default=9)
    p.add_argument("--limit", type=positive, default=3.0)

    p = sub.add_parser("encode", help="posterior means of a split, as .npy")
    p.add_argument("run")
    p.add_argument("items", nargs="*", metavar="[data.key=value]")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--out", required=True, help=".npy file")
    overwrite_option(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("sweep", help="one run per value: key=v1,v2,... (resumable)")
    p.add_argument("items", nargs="*", metavar="[CONFIG] key=v1,v2 [key=value]")
    p.add_argument("--out", required=True, help="the sweep folder")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="one self-contained HTML page comparing runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or one sweep folder")
    p.add_argument("--out", required=True, help="HTML file")
    p.add_argument("--title", default="vaelab report")
    p.add_argument("--iw-samples", type=count, default=100, help="K for runs not yet evaluated")
    overwrite_option(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "config",
        help="print the resolved config (defaults, file, overrides), or a shipped config",
        description="Print the resolved config: the defaults, then CONFIG, then the overrides. "
        "A shipped config's name alone (no overrides, no --json) prints its file as it is, to "
        "copy and edit; --list names the shipped configs.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--list", action="store_true", help="name each shipped config with its description"
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "serve", help="explore runs' latent spaces live in a browser (docs/serve.md)"
    )
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: this machine only)"
    )
    p.add_argument("--port", type=port_number, default=8000, help="0: any free port")
    p.set_defaults(func=cmd_serve)
    for name, p in sub.choices.items():  # every command that reads a config or a run
        if name not in ("env", "demo"):
            plugin_option(p)
    return parser


def plugin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="import your Python file first, for the nets (vaelab.nets.register) or models it "
        "registers; a run of a plugin's net names the file it needs (repeatable)",
    )


def overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even if vaelab did not write it (never a run's own files)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed as ``main`` reads it; a bad argument is a one-line error and
    SystemExit(2)."""
    parser = build_parser()
    # Overrides may come after options (`train --out RUN model.beta=4`): argparse leaves those
    # unparsed, so they are appended to the command's items here.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "items") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items = [*args.items, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="vaelab: %(message)s", level=logging.INFO)
    import vaelab  # noqa: F401  (registers the models before any config is read)

    try:
        for plugin in getattr(args, "plugin", []):  # before any config or run is read
            load_plugin(plugin)
        return args.func(args)
    except USAGE_ERRORS as err:
        print(f"vaelab: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        print(
            f"vaelab: error: out of memory ({_first_line(err)}): lower train.batch_size, "
            "data.size or model.widths",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        about_runs = args.command in ("train", "sweep", "demo")
        print(
            "vaelab: interrupted"
            + (
                "; a run keeps its last finished epoch (continue: --resume RUN), a new run "
                "with no finished epoch is removed"
                if about_runs
                else ""
            ),
            file=sys.stderr,
        )
        return 130


def _out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, MemoryError | torch.OutOfMemoryError) or (
        "can't allocate memory" in str(err)
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if "you tried to allocate" in text:  # torch's CPU allocator: keep the size, drop the rest
        text = "tried to allocate" + text.split("you tried to allocate", 1)[1]
    return (text.splitlines() or [type(err).__name__])[0][:200]


if __name__ == "__main__":
    raise SystemExit(main())
