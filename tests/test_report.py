"""The HTML report and the picture commands, on tiny runs trained here."""

import base64
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import vaelab
from tests.conftest import tiny_config
from vaelab.cli import main
from vaelab.report.html import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on the real mnist5k digits (the report rebuilds each run's data)."""
    out = tmp_path_factory.mktemp("runs")
    fast = ["model.net=mlp", "model.widths=[32]", "model.latent_dim=4", "train.epochs=1"]
    made = []
    for name, extra in [("a_vae", ["model.name=vae"]), ("b_beta", ["model.name=beta_vae"])]:
        made.append(vaelab.train(tiny_config(*fast, *extra, "train.batch_size=256"), out / name))
    return made


def test_report_embeds_every_figure_and_every_run(runs, tmp_path):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r.html"), "--quiet",
                 "--iw-samples", "3"]) == 0  # fmt: skip
    page = (tmp_path / "r.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="([^"]+)"', page)
    assert len(images) == 5 * len(runs)  # curves, reconstructions, samples, interp., traversals
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network
    for run in runs:
        assert run.name in page
        assert (run / "eval" / "val.json").is_file()  # report evaluated the runs first
    assert "Configs that differ" in page and "model.name" in page and "model.beta" in page
    assert "IS negative log-likelihood" in page


def test_report_of_one_run_shows_its_config(runs, tmp_path):
    out = write_report(runs[:1], tmp_path / "one.html")
    page = out.read_text()
    assert "<h2>Config</h2>" in page and "train.lr" in page
    assert page.count("<img ") == 5


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    page = write_report(runs, tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
         f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20  # not a blank page: text, tables and image grids were drawn


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("sample", ["-n", "16", "--temperature", "0.5"]),
        ("reconstruct", ["-n", "8"]),
        ("interpolate", ["--pairs", "2", "--steps", "5"]),
        ("traverse", ["--dims", "3", "--steps", "5"]),
    ],
)
def test_picture_commands_write_pngs(runs, tmp_path, command, extra):
    out = tmp_path / f"{command}.png"
    assert main([command, str(runs[0]), "--out", str(out), *extra]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 100


def test_encode_command(runs, tmp_path):
    out = tmp_path / "z.npy"
    assert main(["encode", str(runs[0]), "--split", "train", "--out", str(out)]) == 0
    assert np.load(out).shape == (4500, 4)
    assert main(["encode", str(runs[0]), "model.beta=3", "--out", str(out)]) == 2


def test_gap_command_writes_the_decomposition_and_the_report_shows_it(runs, tmp_path, capsys):
    figure = tmp_path / "gap.png"
    code = main(["gap", *map(str, runs), "--images", "12", "--ais-steps", "2", "--ais-chains",
                 "2", "--iw-samples", "3", "--q-star-steps", "1", "--quiet", "--figure",
                 str(figure)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and out.count("amortization_gap") == 2 and f"written {figure}" in out
    assert (runs[0] / "eval" / "gap_val.json").is_file()
    assert figure.read_bytes().startswith(PNG_MAGIC)
    page_file = tmp_path / "r.html"
    assert main(["report", *map(str, runs), "--out", str(page_file), "--quiet",
                 "--iw-samples", "3"]) == 0  # fmt: skip
    page = page_file.read_text()
    assert "The ELBO gap taken apart" in page and "amortization_gap" in page
    images = re.findall(r'<img alt="[^"]*" src="([^"]+)"', page)
    assert len(images) == 5 * len(runs) + 1  # the runs' figures and the gap's bars

    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    assert main(["gap", str(runs[0]), "--quiet", "--figure", str(mine)]) == 2
    assert "mine.png" in capsys.readouterr().err
    assert mine.read_bytes() == b"a user's picture"  # refused before any work


def test_evaluate_command(runs, tmp_path, capsys):
    assert main(["evaluate", str(runs[1]), "--iw-samples", "2", "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert '"iw_nll_nats"' in out and '"iw_samples": 2' in out
    assert main(["evaluate", str(runs[1]), "--split", "test", "--quiet"]) == 2
    assert "has no test split" in capsys.readouterr().err
