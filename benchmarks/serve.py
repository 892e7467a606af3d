"""`vaelab serve`'s decode endpoint under load: how fast a slider move becomes an image (run by
hand, not a test).

The CelebA-64 network (the shipped ``celeba_vae`` config's model at data.size 64: conv widths
32-64-128-256-512, latent 128, 3x64x64 images) with random weights (speed does not depend on
them; no CelebA is needed) is saved as a run in a temporary folder and served by a real
``vaelab serve RUN --port 0`` process (uvicorn on 127.0.0.1), with ``--threads`` torch threads
(OMP_NUM_THREADS). The clients, in this process, speak HTTP/1.1 with keep-alive
(``http.client``, one connection per client, TCP_NODELAY as browsers set it) and send
``POST /api/decode`` with a latent drawn from N(0, I) each time (seeded, three decimals); the
time of a request is from sending it to having read the whole PNG.

- one client: ``--requests`` requests one after another (after ``--warmup``): the latency's
  median, 95th and 99th percentiles;
- ``--clients`` clients at once, ``--requests`` requests each: requests per second over the
  whole burst, and the latency percentiles under that load (the server batches the latents of
  concurrent requests into one forward pass);
- in this process, for reference: the decoder's forward pass at batch 1 plus the PNG encoding,
  the server's part of a request (median of ``--requests``).

    python benchmarks/serve.py [--threads 1] [--requests 500] [--clients 8] [--out FILE]

Writes ``results/CAPABILITY/serve.json`` (torch's CPU capability, lower case: ``avx512`` on this
project's machine) with the machine's facts and the load average before the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from vaelab import models, rundir
from vaelab.checkpoint import atomic_write, save_model_config, save_weights
from vaelab.config import dump_yaml, load_config
from vaelab.serve import load_runs
from vaelab.serve.runs import _decode_batch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import hardware_class, machine, write_record  # noqa: E402


def make_run(folder: Path) -> Path:
    """The CelebA-64 network, random weights, saved as a run that ``vaelab.load`` reads."""
    cfg = load_config("celeba_vae", ["data.size=64"])
    torch.manual_seed(0)
    model = models.build(cfg.model, (3, 64, 64))
    run = folder / "celeba64_random"
    run.mkdir()
    save_model_config(run, model, {})
    save_weights(run, model, {"epoch": 0, "step": 0})
    atomic_write(run / rundir.CONFIG, dump_yaml(cfg))
    return run


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def client(host: str, port: int, latents: np.ndarray, times: list[float]) -> None:
    """Decode each latent over one keep-alive connection, appending each request's seconds."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.connect()
    # As browsers do: without it, a body sent after its headers waits for the delayed ACK of
    # the headers (Nagle's algorithm), ~40 ms a request that no server can remove.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for z in latents:
            # three decimals, as a slider's value (the page's sliders step by 0.01)
            body = json.dumps({"run": "celeba64_random", "z": z.round(3).tolist()})
            start = time.perf_counter()
            conn.request("POST", "/api/decode", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            content = response.read()
            times.append(time.perf_counter() - start)
            if response.status != 200 or not content.startswith(b"\x89PNG"):
                raise RuntimeError(f"decode answered {response.status}: {content[:200]!r}")
    finally:
        conn.close()


def in_process(run: Path, requests: int) -> dict[str, float]:
    """The server's own part, without HTTP: forward pass at batch 1 and PNG, per latent."""
    (served,) = load_runs([run])
    rng = np.random.default_rng(1)
    times = []
    with torch.inference_mode():
        for _ in range(requests):
            z = torch.from_numpy(rng.standard_normal(128).astype(np.float32))
            start = time.perf_counter()
            _decode_batch(served, [(z, None)])  # (latent, condition): no condition
            times.append(time.perf_counter() - start)
    return percentiles(times[20:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    facts = machine(torch.device("cpu"))
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512" on this project's machine
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen(
            [sys.executable, "-m", "vaelab", "serve", str(run), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            line = server.stdout.readline()
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if not found:
                raise RuntimeError(f"the server did not start: {line}{server.stderr.read()}")
            port = int(found.group(1))
            client("127.0.0.1", port, rng.standard_normal((args.warmup, 128)), [])
            one: list[float] = []
            client("127.0.0.1", port, rng.standard_normal((args.requests, 128)), one)
            many: list[list[float]] = [[] for _ in range(args.clients)]
            threads = [
                threading.Thread(
                    target=client,
                    args=("127.0.0.1", port, rng.standard_normal((args.requests, 128)), times),
                )
                for times in many
            ]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            burst = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=30)
            server.stdout.close()
            server.stderr.close()
        alone = in_process(run, args.requests)

    together = [t for times in many for t in times]
    record = {
        "what": "POST /api/decode, CelebA-64 network (celeba_vae at data.size 64, latent 128, "
        "random weights), vaelab serve (uvicorn) on 127.0.0.1, http.client keep-alive clients",
        "machine": facts,
        "hardware_class": hardware_class(facts),
        "torch_cpu_capability": capability,
        "server_threads": args.threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "model_form": "speed.for_sampling (eval, batch norms folded), inference_mode",
        "one_client": {"requests": len(one), **percentiles(one)},
        "concurrent": {
            "clients": args.clients,
            "requests": len(together),
            "seconds": round(burst, 2),
            "requests_per_second": round(len(together) / burst, 1),
            **percentiles(together),
        },
        "in_process_decode_and_png": alone,
    }
    out = args.out or HERE / "results" / capability.lower() / "serve.json"
    write_record(out, record)
    print(json.dumps({k: record[k] for k in ("one_client", "concurrent")}, indent=2))
    print(f"in process (forward at batch 1 + PNG): {alone}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
