"""The decoder's upsampling, transposed convolutions against resize-then-convolve
(``model.upsample``), trained alike on the image data available offline (run by hand, not a
test).

For each data set and each seed (``--seeds``, train.seed), one run per decoder through
``vaelab.train``, same config, seed and budget:

- ``mnist5k``: the default config (conv VAE, widths [32, 64], latent 16, Gaussian decoder) on
  the embedded 5,000 digits (4,500 train, 500 val), 28x28, ``--epochs`` epochs;
- ``shapes``: the shipped ``shapes_vae`` config (widths [16, 32, 32, 64], latent 10, Bernoulli
  decoder) on a seeded subset of ``--shapes-subset`` procedural 64x64 sprites,
  ``--shapes-epochs`` epochs.

Reported per run: the validation ELBO (nats per image, the trainer's last validation row),
seconds per epoch (the run's whole time over its epochs: training, validation, checkpoint),
the decoder's forward multiply-adds per image, and the checkerboard statistic (below) of 500
samples, of the reconstructions of 500 validation images, and of the untrained decoder's
samples; the statistic of the validation images themselves is the reference. Then a speed
comparison with less noise than whole runs: training steps (the trainer's, with its speed
options) of the two models taking turns, ``--rounds`` rounds; the median ms per step and the
median of the per-round ratios resize / transpose.

Checkerboard statistic ("Nyquist share"): a pattern that repeats every 2 pixels, and a smooth
image multiplied by one (what uneven kernel overlap in a stride-2 transposed convolution
makes: Odena et al. 2016), puts its spectral energy at the frequency of 1/2 cycle per pixel.
For each image and channel, its mean removed, the share of the energy of its 2-d DFT that lies
in the bins whose vertical or horizontal frequency is 1/2 (the Nyquist row and column), summed
over images before dividing, in percent. White noise gives (H + W - 1) / (H W - 1) (6.9% at
28x28, 3.1% at 64x64); a smooth image far less.

    python benchmarks/upsample.py [--data mnist5k shapes] [--epochs 10] [--shapes-epochs 5]
        [--shapes-subset 10000] [--seeds 0 1 ...] [--threads 1] [--rounds 5] [--grids DIR]
        [--out FILE]

``--threads 1`` by default: on a CPU shared with other processes, two threads each waiting at
the other's barrier ran 2-3x slower than one. ``--grids DIR`` writes the samples and
reconstructions as PNG grids, to look at.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import vaelab
from vaelab import data, models, speed
from vaelab.checkpoint import load, read_metrics
from vaelab.config import RunConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import hardware_class, machine, write_record  # noqa: E402

MODES = ("transpose", "resize")
N_IMAGES = 500  # samples and reconstructions per statistic


def nyquist_share(images: Tensor) -> float:
    """The checkerboard statistic of images (N, C, H, W), H and W even, in percent (above)."""
    h, w = images.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"nyquist_share: expected even sizes, got {h}x{w}")
    x = images.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()  # (N, C, H, W); bin (0, 0) is 0
    nyquist = torch.zeros(h, w, dtype=torch.bool)
    nyquist[h // 2, :] = True
    nyquist[:, w // 2] = True
    return 100 * float(power[..., nyquist].sum() / power.sum())


def configs(name: str, args: argparse.Namespace, seed: int = 0) -> dict[str, RunConfig]:
    """The config of each decoder's run on data set ``name`` with training seed ``seed``."""
    common = ["train.progress=false", f"train.threads={args.threads}", "train.device=cpu"]
    common.append(f"train.seed={seed}")
    if name == "mnist5k":
        path, own = None, [f"train.epochs={args.epochs}"]
    else:
        path = "shapes_vae"
        own = [f"data.subset={args.shapes_subset}", f"train.epochs={args.shapes_epochs}"]
    return {
        mode: vaelab.load_config(path, [*common, *own, f"model.upsample={mode}"]) for mode in MODES
    }


def multiply_adds(decoder: nn.Module, latent_dim: int) -> int:
    """Forward multiply-adds of ``decoder`` for one latent: its convolutions and linear maps."""
    total = 0

    def count(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.ConvTranspose2d):  # every input pixel meets the whole kernel
            kh, kw = module.kernel_size
            total += inputs[0][0].numel() * module.out_channels * kh * kw
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += out[0].numel() * module.in_channels * kh * kw
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in decoder.modules()]
    with torch.no_grad():
        decoder.eval()(torch.zeros(1, latent_dim))
    for hook in hooks:
        hook.remove()
    return total


def images_of(part: data.ImageDataset, n: int) -> Tensor:
    """The first ``n`` images of a split as floats in [0, 1], (n, C, H, W)."""
    x = torch.from_numpy(part.uint8(slice(0, n))).permute(0, 3, 1, 2).float().div(255)
    return (x >= 0.5).float() if part.binarize else x


def grid(images: Tensor, path: Path, columns: int = 10) -> None:
    """The first rows x columns images as one PNG, grey or RGB."""
    from PIL import Image

    n = (min(len(images), 100) // columns) * columns
    c, h, w = images.shape[1:]
    tiles = images[:n].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    rows = tiles.reshape(n // columns, columns, h, w, c).transpose(0, 2, 1, 3, 4)
    picture = rows.reshape(n // columns * h, columns * w, c)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture[..., 0] if c == 1 else picture).save(path)


def train_and_measure(name: str, mode: str, cfg: RunConfig, splits: data.Splits,
                      args: argparse.Namespace) -> dict:  # fmt: skip
    shape = splits.train.shape
    torch.manual_seed(cfg.train.seed)
    untrained = models.build(cfg.model, shape).eval()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = vaelab.train(cfg, Path(tmp) / "run", splits=splits)
        seconds = time.perf_counter() - start
        last = [r for r in read_metrics(run) if r["split"] == "val"][-1]
        model = load(run)
    x = images_of(splits.val, N_IMAGES)
    torch.manual_seed(1)
    samples = model.sample(N_IMAGES)
    recons = model.reconstruct(x)
    torch.manual_seed(1)
    untrained_samples = untrained.sample(N_IMAGES)
    if args.grids:
        folder = Path(args.grids)
        grid(samples, folder / f"{name}_{mode}_samples.png")
        grid(recons, folder / f"{name}_{mode}_recons.png")
        grid(untrained_samples, folder / f"{name}_{mode}_untrained.png")
    return {
        "val_elbo_nats": round(last["elbo_nats"], 2),
        "val_recon": round(last["recon"], 2),
        "val_kl": round(last["kl"], 2),
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / cfg.train.epochs, 1),
        "decoder_multiply_adds": multiply_adds(model.decoder, cfg.model.latent_dim),
        "parameters": sum(p.numel() for p in model.parameters()),
        "nyquist_share_samples": round(nyquist_share(samples), 3),
        "nyquist_share_recons": round(nyquist_share(recons), 3),
        "nyquist_share_untrained_samples": round(nyquist_share(untrained_samples), 3),
    }


def step_times(cfgs: dict[str, RunConfig], splits: data.Splits, rounds: int) -> dict:
    """Training steps of each decoder's model taking turns: per round, 5 timed steps of each
    (after 3 untimed), on the same batch; the trainer's speed options (fast layers,
    channels-last, fused Adam)."""
    device = torch.device("cpu")
    tc = cfgs[MODES[0]].train
    torch.set_num_threads(tc.threads or torch.get_num_threads())
    x = images_of(splits.train, tc.batch_size)
    steps = {}
    for mode, cfg in cfgs.items():
        torch.manual_seed(0)
        model = speed.prepare(models.build(cfg.model, splits.train.shape), cfg.train, device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
        steps[mode] = (model, opt)
    xb = speed.inputs(x, tc)

    def step(mode: str) -> None:
        model, opt = steps[mode]
        loss = model(xb).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            for _ in range(3):
                step(mode)
            start = time.perf_counter()
            for _ in range(5):
                step(mode)
            times[mode].append((time.perf_counter() - start) / 5)
    ratios = [r / t for t, r in zip(times["transpose"], times["resize"], strict=True)]
    return {
        "batch": tc.batch_size,
        "ms_per_step": {m: round(1000 * statistics.median(t), 1) for m, t in times.items()},
        "ratio_resize_over_transpose": round(statistics.median(ratios), 2),
        "ratios": [round(r, 2) for r in ratios],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["mnist5k", "shapes"])
    parser.add_argument("--epochs", type=int, default=10, help="mnist5k")
    parser.add_argument("--shapes-epochs", type=int, default=5)
    parser.add_argument("--shapes-subset", type=int, default=10000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grids", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    facts = machine(torch.device("cpu"))
    out = args.out or str(HERE / "results" / hardware_class(facts) / "upsample.json")
    record: dict = {"machine": facts, "args": vars(args), "results": {}}
    for name in args.data:
        cfgs = configs(name, args)
        splits = data.build(cfgs[MODES[0]].data, progress=False)
        data_share = nyquist_share(images_of(splits.val, N_IMAGES))
        result: dict = {"nyquist_share_val_images": round(data_share, 3)}
        for seed in args.seeds:
            for mode, cfg in configs(name, args, seed).items():
                run = train_and_measure(f"{name}_seed{seed}", mode, cfg, splits, args)
                result.setdefault(mode, {})[f"seed {seed}"] = run
                print(name, mode, f"seed {seed}", json.dumps(run), flush=True)
        for mode in MODES:
            elbos = [run["val_elbo_nats"] for run in result[mode].values()]
            result[mode]["mean_val_elbo_nats"] = round(statistics.mean(elbos), 2)
        result["steps"] = step_times(cfgs, splits, args.rounds)
        print(name, "steps", json.dumps(result["steps"]), flush=True)
        record["results"][name] = result
    print(json.dumps(record["results"], indent=2))
    write_record(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
