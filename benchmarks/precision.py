"""What mixed precision does to the numbers, at full scale (run by hand, not a test).

Trains the default configuration (conv VAE on the embedded mnist5k, 10 epochs) once per
precision with the same seed and compares the final validation ELBO with fp32's; the tests do
the same at small scale (tests/test_train.py).

    python benchmarks/precision.py [--precisions fp32 bf16 fp16] [--epochs 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import vaelab
from vaelab import data
from vaelab.checkpoint import read_metrics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import machine, write_record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(HERE / "results" / "precision.json"))
    args = parser.parse_args()
    results = {}
    splits = None
    for precision in args.precisions:
        cfg = vaelab.load_config(
            overrides=[
                f"train.precision={precision}",
                f"train.epochs={args.epochs}",
                f"train.device={args.device}",
                "train.progress=false",
                "train.allow_emulated=true",  # measured as asked, even where emulated
            ]
        )
        splits = splits or data.build(cfg.data, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            run = vaelab.train(cfg, Path(tmp) / "run", splits=splits)
            seconds = time.perf_counter() - t
            last = read_metrics(run)[-1]
        results[precision] = {
            "val_elbo_nats": round(last["elbo_nats"], 3),
            "val_recon": round(last["recon"], 3),
            "val_kl": round(last["kl"], 3),
            "seconds": round(seconds, 1),
        }
        print(precision, results[precision], flush=True)
    reference = results.get("fp32", {}).get("val_elbo_nats")
    if reference is not None:
        for r in results.values():
            r["elbo_vs_fp32"] = round(r["val_elbo_nats"] / reference - 1, 5)
    record = {
        "machine": machine(torch.device(args.device)),
        "config": "defaults (conv VAE on mnist5k)",
        "epochs": args.epochs,
        "results": results,
    }
    print(json.dumps(record, indent=2))
    write_record(args.out, record)


if __name__ == "__main__":
    main()
