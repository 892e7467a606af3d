"""Data-parallel training: torchrun with 2 CPU processes (gloo) trains the same model as one.

The runs use train.precision=fp64: in fp32, Adam's first steps are nearly sign steps, so a weight
whose gradient is a cancellation of large terms moves by +lr or -lr depending on summation
order, and two correct implementations differ by 2 x lr in that weight. In fp64 rounding is
1e9 times smaller (the two runs end about 1e-7 apart), and the comparison checks the algorithm:
sharding, noise, gradient averaging and batch-norm statistics across ranks.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vaelab import models
from vaelab.config import load_config
from vaelab.rng import batch_rand, batch_randn, noise_shard

# A conv net with batch norm on the embedded MNIST data; 2 epochs of 17 steps at batch 256.
ARGS = [
    "model.widths=[4,8]",
    "model.latent_dim=2",
    "train.batch_size=256",
    "train.precision=fp64",
    "train.progress=false",
    "train.threads=1",
    "data.flip=true",  # flips are noise too: drawn per global batch
]


def _train(nproc: int, *args: str) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "vaelab"]
        if nproc == 1
        else [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *(f"--nproc_per_node={nproc}", "-m", "vaelab"),
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [*launcher, "train", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "one"
    _train(1, "--out", str(run), *ARGS, "train.epochs=2")
    return run


def test_two_processes_train_the_same_weights_as_one(one_process, tmp_path):
    run = tmp_path / "two"
    done = _train(2, "--out", str(run), *ARGS, "train.epochs=2")
    assert done.stdout.count("run: ") == 1  # rank 0 speaks for the job
    one, two = _weights(one_process), _weights(run)
    assert _max_diff(one, two) < 1e-4
    # ... and training did move them: the agreement is not that of two untouched models.
    torch.manual_seed(0)
    cfg = load_config(overrides=ARGS).model
    start = {k: v.double() for k, v in models.build(cfg, (1, 28, 28)).state_dict().items()}
    assert _max_diff(start, one) > 1e-2
    # Batch-norm running statistics are those of the global batch on every rank.
    assert (
        _max_diff(
            {k: v for k, v in one.items() if "running" in k},
            {k: v for k, v in two.items() if "running" in k},
        )
        < 1e-6
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["epoch"], r["step"]) for r in rows] == [
        (r["split"], r["epoch"], r["step"]) for r in ref
    ]
    for r, q in zip(rows, ref, strict=True):  # metrics are averaged over all ranks' images
        assert r["elbo_nats"] == pytest.approx(q["elbo_nats"], rel=1e-6)


def test_a_run_stopped_on_two_processes_resumes_on_one(one_process, tmp_path):
    run = tmp_path / "two_then_one"
    _train(2, "--out", str(run), *ARGS, "train.epochs=1")
    _train(1, "--resume", str(run), "train.epochs=2")
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [1, 1, 2, 2]
    assert _max_diff(_weights(one_process), _weights(run)) < 1e-4


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.batch_size=255", "config key 'train.batch_size': the global batch is split over 2"),
        ("model.name=sigma_vae", "config key 'model.name': sigma_vae cannot be split"),
        ("model.name=beta_vae_capacity", "beta_vae_capacity cannot be split"),
        ("model.free_bits=0.5", "config key 'model.free_bits'"),
    ],
)
def test_what_cannot_be_split_over_processes_is_refused(tmp_path, setting, message):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc_per_node=2", "-m", "vaelab", "train", "--out", str(tmp_path / "r")),
            *ARGS,
            setting,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("n", [7, 8])
def test_sharded_noise_is_the_single_process_noise(n):
    torch.manual_seed(3)
    whole = torch.randn(2, n, 5), torch.rand(n)
    for rank in range(2):
        torch.manual_seed(3)
        local = len(range(rank, n, 2))
        with noise_shard(rank, 2, n):
            eps = batch_randn((2, local, 5), 1, device="cpu")
            flips = batch_rand((local,), 0, device="cpu")
        assert torch.equal(eps, whole[0][:, rank::2])
        assert torch.equal(flips, whole[1][rank::2])
    with noise_shard(0, 2, n), pytest.raises(RuntimeError, match="holds"):
        batch_randn((2, n, 5), 1, device="cpu")


def test_an_odd_validation_batch_is_split_and_summed_exactly(tmp_path):
    # shapes: 459 train / 51 val images; batch 64: one validation batch of 51, split 26 + 25.
    args = [*ARGS, "data.name=shapes", "data.subset=510", "train.batch_size=64", "train.epochs=1"]
    _train(1, "--out", str(tmp_path / "one"), *args)
    _train(2, "--out", str(tmp_path / "two"), *args)
    one, two = (
        [json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    )
    assert one[-1]["split"] == two[-1]["split"] == "val"
    for key in ("elbo_nats", "recon", "kl"):
        # weights ~1e-7 apart; the KL is only ~0.006 nats after this one epoch, so 1e-6 nats
        assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-6, abs=1e-6)
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-4


def test_factor_vae_two_processes_train_what_one_does(tmp_path):
    """The discriminator's shuffle mixes the rows of the whole global batch: each process gathers
    every rank's codes and shuffles them with the noise one process draws. shapes: 459 train /
    51 val images, batch 64, one epoch; the odd validation batch (26 + 25 rows) is gathered too.
    A fast discriminator (lr 0.01) makes a wrong shuffle show in its weights."""
    args = [*ARGS, "data.name=shapes", "data.subset=510", "train.batch_size=64", "train.epochs=1",
            "model.name=factor_vae", "model.disc_layers=2", "model.disc_width=32",
            "model.disc_lr=0.01"]  # fmt: skip
    _train(1, "--out", str(tmp_path / "one"), *args)
    _train(2, "--out", str(tmp_path / "two"), *args)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert _max_diff(one, two) < 1e-4
    disc = lambda w: {k: v for k, v in w.items() if k.startswith("discriminator.")}  # noqa: E731
    assert _max_diff(disc(one), disc(two)) < 1e-6
    rows = [
        [json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    for r, q in zip(*rows, strict=True):  # train (7 steps) and val rows: the shuffles agree
        for key in ("elbo_nats", "tc", "disc_loss"):
            assert r[key] == pytest.approx(q[key], rel=1e-6, abs=1e-9), (r["split"], key)
        assert r["disc_acc"] == q["disc_acc"]
