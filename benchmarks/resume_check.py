"""Exact resume on a device, checked end to end through the command line.

Trains a small run uninterrupted; trains it again, kills that process with SIGKILL after its
first checkpoint, resumes it; then compares the two runs' final weights. On the CPU they are
equal bit for bit (tests/hostile/test_runs.py asserts it); on a GPU cuDNN's autotuned
algorithms may differ between processes, so the largest difference is reported, not asserted.

    python benchmarks/resume_check.py --device cuda [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.numpy import load_file

SETTINGS = [
    "data.name=shapes", "data.subset=8192", "model.widths=[16,32,64]", "model.latent_dim=8",
    "train.epochs=6", "train.batch_size=64", "train.lr_schedule=cosine",
]  # fmt: skip


def vaelab(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "VAELAB_CACHE": str(cwd / "cache")}
    return subprocess.Popen([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="a JSON file for the result")
    args = parser.parse_args()
    settings = [*SETTINGS, f"train.device={args.device}", "train.progress=false"]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        start = time.perf_counter()
        assert vaelab("train", "--out", "whole", *settings, cwd=home).wait() == 0
        seconds = time.perf_counter() - start
        cut = vaelab("train", "--out", "cut", *settings, cwd=home)
        state = home / "cut" / "state" / "train_state.safetensors"
        while not state.exists():
            assert cut.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.01)
        cut.send_signal(signal.SIGKILL)
        cut.wait()
        killed_after = json.loads((home / "cut" / "metrics.jsonl").read_text().splitlines()[-1])[
            "epoch"
        ]
        assert vaelab("train", "--resume", "cut", cwd=home).wait() == 0
        whole, resumed = (
            load_file(home / "whole" / "model.safetensors"),
            load_file(home / "cut" / "model.safetensors"),
        )
        diff = max(float(abs(whole[k].astype("f8") - resumed[k]).max()) for k in whole)
        result = {
            "device": args.device,
            "settings": settings,
            "killed_after_epoch": killed_after,
            "uninterrupted_seconds": round(seconds, 1),
            "identical": all((whole[k] == resumed[k]).all() for k in whole),
            "max_abs_difference": diff,
        }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
