"""The disentanglement table: the shipped shapes configs over several seeds, at a stated budget.

Trains each of ``configs/shapes_{beta_vae,beta_tcvae,factor_vae,dip_vae}.yaml`` (and any given
with --configs) once per seed through ``vaelab.train``, evaluates the val split with
``vaelab.evaluate`` (MIG, beta-VAE score, FactorVAE score, DCI), and writes every run's numbers,
their mean and spread over the seeds, the budget and the machine to
``benchmarks/results/CLASS/disentanglement.json``. A run already trained is evaluated again only
if its eval file is missing, so the script can be stopped and run again.

    python benchmarks/disentanglement.py --out runs/disentangle --seeds 0 1 2 \
        --set data.subset=10000 train.epochs=3
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

import vaelab
from vaelab.evaluate import evaluate

CONFIGS = ["shapes_beta_vae", "shapes_beta_tcvae", "shapes_factor_vae", "shapes_dip_vae"]
KEYS = [
    "mig",
    "beta_vae_score",
    "factor_vae_score",
    "dci_disentanglement",
    "dci_completeness",
    "dci_informativeness",
    "kl",
    "elbo_nats",
]


def train_seconds(run: Path) -> float:
    """The training time the run itself recorded (the last metrics.jsonl row), so a second
    pass of this script, which skips trained runs, still reports it."""
    rows = (run / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(rows[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/disentangle"))
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run (budget)")
    parser.add_argument("--iw-samples", type=int, default=5)
    parser.add_argument("--results", type=Path, help="default: benchmarks/results/CLASS/...")
    args = parser.parse_args()
    cls = "avx512" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "avx2"
    results = args.results or Path(__file__).parent / "results" / cls / "disentanglement.json"
    record: dict = {
        "machine": {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "overrides": args.set,
        "runs": {},
        "summary": {},
    }
    for name in args.configs:
        rows = []
        for seed in args.seeds:
            run = args.out / f"{name}_seed{seed}"
            if not (run / "model.safetensors").is_file():
                cfg = vaelab.load_config(name, [*args.set, f"train.seed={seed}",
                                                "train.progress=false"])  # fmt: skip
                vaelab.train(cfg, run)
            path = run / "eval" / "val.json"
            if path.is_file():
                result = json.loads(path.read_text())
            else:
                result = evaluate(run, "val", args.iw_samples, progress=False)
            row = {k: result.get(k) for k in KEYS}
            row["train_seconds"] = train_seconds(run)
            record["runs"][f"{name}/seed{seed}"] = row
            rows.append(row)
            print(name, seed, {k: round(v, 3) for k, v in row.items() if v is not None}, flush=True)
        record["summary"][name] = {
            k: {"mean": float(np.mean([r[k] for r in rows])),
                "std": float(np.std([r[k] for r in rows]))}
            for k in KEYS if all(r[k] is not None for r in rows)
        }  # fmt: skip
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {results}")


if __name__ == "__main__":
    main()
