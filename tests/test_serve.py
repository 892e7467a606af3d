"""`vaelab serve`: a real uvicorn server on a free port, driven over HTTP (docs/serve.md)."""

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import vaelab
from tests.serve_runs import make_cvae_run, make_runs
from vaelab import serve
from vaelab.checkpoint import load
from vaelab.data.images import load_image
from vaelab.report import pictures
from vaelab.report.draw import run_split
from vaelab.serve.runs import MAX_UPLOAD_PIXELS, grid_png

UPLOAD_LIMIT = 64 * 1024  # small, so an oversized upload fits in the sockets' buffers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(runs):
    with serve.serving(serve.load_runs(list(runs.values())), max_upload=UPLOAD_LIMIT) as url:
        yield url


def call(url, path, body=None, headers=None, method=None):
    """(status, content type, body bytes) of one request; errors are answers too."""
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    request = urllib.request.Request(url + path.lstrip("/"), data, headers or {}, method=method)
    if isinstance(body, dict | list):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def png_image(content):
    img = Image.open(io.BytesIO(content))
    assert img.format == "PNG"
    return np.asarray(img)


def refused(answer, status, words):
    """A 4xx with a one-line JSON error that says ``words``."""
    code, kind, content = answer
    assert code == status, content
    assert kind == "application/json"
    message = json.loads(content)["error"]
    assert "\n" not in message
    assert re.search(words, message), message
    return message


def picture_bytes(fmt="PNG", size=(30, 20), mode="RGB"):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
        buf, format=fmt
    )
    return buf.getvalue()


def multipart(content, filename="face.png"):
    boundary = "vaelabtestboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"'
            f"\r\nContent-Type: image/png\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_runs_lists_shape_dims_by_activity_and_evaluation(runs, server):
    code, kind, content = call(server, "/api/runs")
    assert code == 200 and kind == "application/json"
    listing = {run["name"]: run for run in json.loads(content)["runs"]}
    vae = listing["vae"]
    assert vae["latent_dim"] == 3 and vae["has_encoder"]
    assert vae["shape"] == {"channels": 3, "height": 8, "width": 8}
    assert sorted(d["index"] for d in vae["dims"]) == [0, 1, 2]
    assert vae["val"]["count"] == 10 and vae["val"]["shown"] == list(range(10))
    assert listing["decoder_only"]["has_encoder"] is False
    assert listing["decoder_only"]["dims_order"].startswith("no encoder")


def test_dims_and_numbers_come_from_the_runs_eval_json(runs, tmp_path):
    """A run evaluated: its sliders follow eval/val.json's kl_per_dim, most first, and its
    numbers are the file's (a NaN, which JSON cannot hold, becomes null)."""
    import shutil

    run = tmp_path / "vae"
    shutil.copytree(runs["vae"], run)
    (run / "eval").mkdir()
    numbers = {"elbo_nats": -123.5, "kl_per_dim": [0.5, 2.0, 1.0], "iw_bpd": float("nan")}
    (run / "eval" / "val.json").write_text(json.dumps(numbers))
    (described,) = [r.describe() for r in serve.load_runs([run])]
    assert [d["index"] for d in described["dims"]] == [1, 2, 0]
    assert [d["kl"] for d in described["dims"]] == [2.0, 1.0, 0.5]
    assert described["dims_order"] == "KL per dimension, eval/val.json"
    assert described["evaluation"]["val"]["elbo_nats"] == -123.5
    assert described["evaluation"]["val"]["iw_bpd"] is None


def test_decode_is_the_models_decoder_mean(runs, server):
    z = [0.5, -1.0, 2.0]
    code, kind, content = call(server, "/api/decode", {"run": "vae", "z": z})
    assert code == 200 and kind == "image/png"
    model = load(runs["vae"])
    with torch.no_grad():
        expected = model.decode(torch.tensor([z]))[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(png_image(content).astype(float) - expected).max() <= 1.0  # rounding only


def test_concurrent_decodes_each_get_their_own_image(server):
    """Requests decoded in one batch come back to the client that sent each latent."""
    latents = [[t, -t, 0.5 * t] for t in np.linspace(-2, 2, 12)]

    def one(z):
        return png_image(call(server, "/api/decode", {"run": "vae", "z": z})[2])

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, latents))
    assert len({image.tobytes() for image in together}) == len(latents)  # not one image for all
    for z, image in zip(latents, together, strict=True):
        assert np.array_equal(image, one(z))


def test_sample_grid_and_seed(server):
    code, kind, first = call(server, "/api/sample?run=vae&n=16&temperature=1")
    assert code == 200 and kind == "image/png"
    grid = png_image(first)
    assert grid.shape == (4 * 10 + 2, 4 * 10 + 2, 3)  # 4x4 images of 8 pixels, 2 apart
    assert call(server, "/api/sample?run=vae&n=16&temperature=1")[2] == first
    assert call(server, "/api/sample?run=vae&n=16&temperature=1&seed=1")[2] != first
    assert call(server, "/api/sample?run=decoder_only&n=4&temperature=0.5")[0] == 200


def test_reconstruct_converts_an_upload_as_the_data_loading_does(runs, server, tmp_path):
    content = picture_bytes("JPEG", size=(30, 20))
    for body, headers in [(content, {"Content-Type": "image/jpeg"}), multipart(content)]:
        code, kind, answer = call(server, "/api/reconstruct?run=vae", body, headers)
        assert code == 200 and kind == "image/png"
        reconstruction = png_image(answer)
        assert reconstruction.shape == (8, 8, 3)
    # what the model saw: data.images.load_image on the file, centre square, 8x8
    (tmp_path / "up.jpg").write_bytes(content)
    expected = load_image(tmp_path / "up.jpg", 8, 0, 3)
    code, _, answer = call(server, "/api/encode?run=vae", content)
    encoded = json.loads(answer)
    assert code == 200 and len(encoded["z"]) == 3 and len(encoded["std"]) == 3
    seen = encoded["input_png"].split(",", 1)[1]
    assert np.array_equal(png_image(base64.b64decode(seen)), expected)
    model = load(runs["vae"])
    x = torch.from_numpy(expected.copy()).permute(2, 0, 1)[None].float() / 255
    assert np.allclose(encoded["z"], model.encode(x).mode()[0].tolist(), atol=1e-4)
    with torch.no_grad():  # the reconstruction is the model's, to a grey level
        mean = model.eval().reconstruct(x)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(reconstruction.astype(float) - mean).max() <= 1.0


def test_interpolation_between_val_images_and_latents(server):
    body = {"run": "vae", "from": {"val": 0}, "to": {"val": 3}, "steps": 5}
    code, kind, content = call(server, "/api/interpolate", body)
    assert code == 200 and kind == "image/png"
    assert png_image(content).shape == (12, 5 * 10 + 2, 3)
    body = {"run": "decoder_only", "from": {"z": [0, 0, 0]}, "to": {"z": [1, 1, 1]}}
    assert call(server, "/api/interpolate", body)[0] == 200
    code, _, z = call(server, "/api/val/latent?run=vae&index=3")
    assert code == 200 and len(json.loads(z)["z"]) == 3
    assert png_image(call(server, "/api/val?run=vae&index=3")[2]).shape == (8, 8, 3)
    codes = json.loads(call(server, "/api/codes?run=vae")[2])
    assert len(codes["dims"]) == 2 and len(codes["points"]) == 10


BAD_REQUESTS = [
    # (method, path, body, headers, status, words)
    ("POST", "/api/decode", {"run": "vae", "z": [0, 1]}, None, 400, "expected 3 numbers"),
    ("POST", "/api/decode", {"run": "vae", "z": [0, 1, 2, 3]}, None, 400, "got 4"),
    ("POST", "/api/decode", b'{"run": "vae", "z": [0, NaN, 1]}', None, 400, r"'z'\[1\]: .*finite"),
    ("POST", "/api/decode", b'{"run": "vae", "z": [0, Infinity, 1]}', None, 400, "finite"),
    ("POST", "/api/decode", {"run": "vae", "z": [0, "a", 1]}, None, 400, "expected a number"),
    ("POST", "/api/decode", {"run": "vae", "z": [0, True, 1]}, None, 400, "finite number"),
    ("POST", "/api/decode", {"run": "vae", "z": [0, 1e6, 1]}, None, 400, "from -1000 to 1000"),
    ("POST", "/api/decode", {"run": "vae", "z": "0,1,2"}, None, 400, "a list of 3 numbers"),
    ("POST", "/api/decode", {"run": "nope", "z": [0, 0, 0]}, None, 404, "unknown run 'nope'"),
    ("POST", "/api/decode", {"z": [0, 0, 0]}, None, 400, "'run'"),
    ("POST", "/api/decode", b"{not json", None, 400, "not valid JSON"),
    ("POST", "/api/decode", [1, 2], None, 400, "a JSON object"),
    ("POST", "/api/decode", b"[" * 100_000, None, 400, "not valid JSON"),
    ("GET", "/api/decode", None, None, 405, "method not allowed"),
    ("GET", "/api/sample?run=vae&n=65", None, None, 400, "'n': .*1 to 64, got 65"),
    ("GET", "/api/sample?run=vae&n=0", None, None, 400, "'n'"),
    ("GET", "/api/sample?run=vae&n=lots", None, None, 400, "'n': expected an integer"),
    ("GET", "/api/sample?run=vae&temperature=nan", None, None, 400, "'temperature'"),
    ("GET", "/api/sample?run=vae&temperature=0", None, None, 400, "> 0"),
    ("GET", "/api/sample?run=vae&sampler=gmm", None, None, 400, "no post-hoc sampler"),
    ("GET", "/api/sample?run=ghost", None, None, 404, "unknown run"),
    ("GET", "/api/sample", None, None, 400, "'run'"),
    ("POST", "/api/reconstruct?run=vae", b"GIF89a not really", None, 415, "not an image"),
    ("POST", "/api/reconstruct?run=vae", b"%PDF-1.4 ...", None, 415, "not an image"),
    ("POST", "/api/reconstruct?run=vae", b"", None, 400, "empty"),
    ("POST", "/api/reconstruct?run=vae", b"x" * (UPLOAD_LIMIT + 1), None, 413, "larger than"),
    ("POST", "/api/reconstruct?run=vae", *multipart(b"x" * UPLOAD_LIMIT), 413, "larger than"),
    ("POST", "/api/reconstruct?run=vae", *multipart(b"not an image"), 415, "not an image"),
    ("POST", "/api/reconstruct?run=vae", b"--x\r\n", {"Content-Type": "multipart/form-data"},
     400, "boundary"),
    ("POST", "/api/reconstruct?run=decoder_only", picture_bytes(), None, 400, "has no encoder"),
    ("POST", "/api/encode?run=decoder_only", picture_bytes(), None, 400, "has no encoder"),
    ("POST", "/api/reconstruct?run=ghost", picture_bytes(), None, 404, "unknown run"),
    ("POST", "/api/interpolate", {"run": "decoder_only", "from": {"val": 0}, "to": {"val": 1}},
     None, 400, "has no encoder"),
    ("POST", "/api/interpolate", {"run": "vae", "from": {"val": 99}, "to": {"val": 1}}, None,
     400, "'from.val': .*0 to 9"),
    ("POST", "/api/interpolate", {"run": "vae", "from": {"z": [0]}, "to": {"val": 1}}, None,
     400, "'from.z': expected 3"),
    ("POST", "/api/interpolate", {"run": "vae", "from": 3, "to": {"val": 1}}, None, 400,
     "'from': expected"),
    ("POST", "/api/interpolate", {"run": "vae", "from": {"val": 0}, "to": {"val": 1},
     "steps": 1000}, None, 400, "'steps'"),
    ("GET", "/api/val?run=vae&index=10", None, None, 400, "'index'"),
    ("GET", "/api/val?run=vae&index=-1", None, None, 400, "'index'"),
    ("GET", "/api/codes?run=decoder_only", None, None, 400, "has no encoder"),
    ("GET", "/api/nothing", None, None, 404, "no such page"),
    ("GET", "/../../etc/passwd", None, None, 404, "no such page"),
    ("GET", "/static/../app.py", None, None, 404, "no such page"),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd", None, None, 404, "no such page"),
    ("GET", "/index.html", None, None, 404, "no such page"),
    ("GET", "/api/runs", None, {"Host": "attacker.example"}, 400, "localhost only"),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, path, body, headers, status, words",
    BAD_REQUESTS,
    ids=[f"{m} {p[:40]} {s}" for m, p, _, _, s, _ in BAD_REQUESTS],
)
def test_bad_input_is_a_one_line_4xx_and_the_server_goes_on(
    server, method, path, body, headers, status, words
):
    refused(call(server, path, body, headers, method), status, words)
    assert call(server, "/api/decode", {"run": "vae", "z": [0, 0, 0]})[0] == 200


def test_huge_image_in_a_small_file_is_refused_before_decoding(server, monkeypatch):
    # a 1-bit-per-pixel PNG of 7,000 x 7,000: a few kB on the wire, 49 megapixels decoded
    buf = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < UPLOAD_LIMIT and MAX_UPLOAD_PIXELS < 7000 * 7000
    refused(call(server, "/api/reconstruct?run=vae", buf.getvalue()), 413, "7000x7000 pixels")


def test_page_and_its_assets_are_served_from_the_package(server):
    code, kind, page = call(server, "/")
    assert code == 200 and kind.startswith("text/html")
    # every URL the page names is one of its own (no CDN, no font or script from elsewhere)
    assert re.findall(rb'(?:src|href)="([^"]+)"', page) == [b"/app.css", b"data:,", b"/app.js"]
    for path, kind_start in (("/app.js", "text/javascript"), ("/app.css", "text/css")):
        code, kind, content = call(server, path)
        assert code == 200 and kind.startswith(kind_start) and content
        assert b"http://" not in content and b"https://" not in content
    with urllib.request.urlopen(server, timeout=10) as response:
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_uploads_are_never_written_to_disk(runs, monkeypatch):
    """No temporary file is made while an upload (multipart or raw) is read and used, even one
    above the 1 MB at which a spooled form parser would move it to disk."""
    import tempfile

    made = []
    original = tempfile.SpooledTemporaryFile.__init__

    def spy(self, *args, **kwargs):
        made.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "__init__", spy)
    content = picture_bytes(size=(800, 600))
    assert len(content) > 1024 * 1024
    with serve.serving(serve.load_runs([runs["vae"]])) as server:
        body, headers = multipart(content)
        assert call(server, "/api/reconstruct?run=vae", body, headers)[0] == 200
        assert call(server, "/api/encode?run=vae", content)[0] == 200
    assert made == []


def test_the_command_line_serves_until_interrupted(runs):
    """`vaelab serve RUN --port 0` prints its address on 127.0.0.1, answers, and stops on
    Ctrl+C (SIGINT) with the usual one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vaelab", "serve", str(runs["vae"]), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # Ctrl+C as a terminal sends it: a shell starts background jobs with SIGINT ignored,
        # which the child would inherit (and then not stop on it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert call(url, "/api/decode", {"run": "vae", "z": [0, 0, 0]})[0] == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130  # the shell's code for Ctrl+C
        assert process.stderr.read().strip().endswith("vaelab: interrupted")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_command_line_errors_are_one_line(runs, tmp_path, capsys):
    from vaelab.cli import main

    assert main(["serve", str(tmp_path / "none")]) == 2
    assert "a vaelab run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(runs["vae"]), "--port", "70000"])
    assert "expected a port from 0 to 65535" in capsys.readouterr().err


def test_listening_socket_lets_asyncio_turn_off_nagle():
    """asyncio sets TCP_NODELAY only on sockets created with IPPROTO_TCP; without it, every
    response waited ~40 ms for a delayed ACK (benchmarks/serve.py measured 52 ms, now 9)."""
    import socket

    from vaelab.serve.app import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_any_loopback_address_is_served_and_a_foreign_host_still_refused(runs):
    """Bound to 127.0.0.2 (loopback, not 127.0.0.1), requests naming it are answered; a Host
    header naming another machine is still refused (DNS rebinding)."""
    with serve.serving(serve.load_runs([runs["vae"]]), host="127.0.0.2") as server:
        assert server.startswith("http://127.0.0.2:")
        assert call(server, "/api/runs")[0] == 200
        assert call(server, "/api/runs", headers={"Host": "evil.example"})[0] == 400


# -- a conditional model (cvae): every request under one condition ------------------------------
@pytest.fixture(scope="module")
def cvae(tmp_path_factory):
    run = make_cvae_run(tmp_path_factory.mktemp("serve-cvae"))
    with serve.serving(serve.load_runs([run])) as url:
        yield run, url


def test_a_cvae_lists_its_variables_with_the_datas_most_common_values(cvae):
    run, url = cvae
    (listed,) = json.loads(call(url, "/api/runs")[2])["runs"]
    val = run_split(run, "val")
    common = int(np.bincount(val._labels[val.rows], minlength=10).argmax())
    assert listed["conditions"] == [{"name": "label", "size": 10, "default": common}]


def test_a_cvae_decodes_and_samples_under_the_condition_asked_for(cvae):
    run, url = cvae
    model = load(run)
    z = [0.3, -0.2, 1.0]
    images = {}
    for label in (2, 7):
        code, _, content = call(url, "/api/decode", {"run": "cvae", "z": z,
                                                     "condition": {"label": label}})  # fmt: skip
        assert code == 200
        images[label] = png_image(content).astype(float)
        with torch.no_grad(), model.given(torch.tensor([[label]])):
            expected = model.decode(torch.tensor([z]))[0, 0].numpy() * 255  # grey: (H, W)
        assert np.abs(images[label] - expected).max() <= 1.0
    assert np.abs(images[2] - images[7]).max() > 1.0  # the condition reaches the decoder
    # no condition: the run's default; a sample grid under label=7 is the decoder's for 7
    default = json.loads(call(url, "/api/runs")[2])["runs"][0]["conditions"][0]["default"]
    body = {"run": "cvae", "z": z, "condition": {"label": default}}
    assert call(url, "/api/decode", {"run": "cvae", "z": z})[2] == call(url, "/api/decode", body)[2]
    seven = png_image(call(url, "/api/sample?run=cvae&n=4&seed=3&condition=label%3D7")[2])
    expected = pictures.samples(model, 4, 1.0, 3, condition=torch.tensor([7]))
    grid = png_image(grid_png(expected, 2))
    assert np.abs(seven.astype(float) - grid).max() <= 1.0
    two = call(url, "/api/sample?run=cvae&n=4&seed=3&condition=label%3D2")[2]
    assert png_image(two).tobytes() != seven.tobytes()


def test_a_cvae_reconstructs_and_walks_under_the_condition(cvae):
    run, url = cvae
    model = load(run).eval()
    content = picture_bytes(size=(12, 12), mode="L")
    code, _, answer = call(url, "/api/reconstruct?run=cvae&condition=label%3D4", content)
    assert code == 200
    encoded = json.loads(call(url, "/api/encode?run=cvae&condition=label%3D4", content)[2])
    seen = torch.from_numpy(png_image(base64.b64decode(encoded["input_png"].split(",")[1])).copy())
    x = seen.float()[None, None] / 255
    with torch.no_grad(), model.given(torch.tensor([[4]])):
        assert np.allclose(encoded["z"], model.encode(x).mode()[0].tolist(), atol=1e-4)
        mean = model.reconstruct(x)[0, 0].numpy() * 255
    assert np.abs(png_image(answer).astype(float) - mean).max() <= 1.0
    # a validation image is encoded under its own label, whatever the request's condition
    val = run_split(run, "val")
    own = int(val._labels[val.rows[5]])
    code, _, answer = call(url, "/api/val/latent?run=cvae&index=5")
    x = val.batch(np.array([5]))
    with torch.no_grad():
        means = {}
        for label in (own, (own + 1) % 10):
            with model.given(torch.tensor([[label]])):
                means[label] = model.encode(x).mode()[0]
    assert np.allclose(json.loads(answer)["z"], means[own].tolist(), atol=1e-5)
    assert not np.allclose(means[own], means[(own + 1) % 10], atol=1e-3)
    walk = {"run": "cvae", "from": {"val": 0}, "to": {"val": 5}, "steps": 3}
    three = call(url, "/api/interpolate", {**walk, "condition": {"label": 3}})
    assert three[0] == 200
    assert three[2] != call(url, "/api/interpolate", {**walk, "condition": {"label": 8}})[2]


def test_concurrent_decodes_of_a_cvae_each_get_their_own_condition(cvae):
    """Requests decoded in one batch, each under its own label, come back as each alone."""
    _, url = cvae
    asks = [([0.1 * k, -0.5, 1.0], k % 10) for k in range(16)]

    def one(ask):
        z, label = ask
        body = {"run": "cvae", "z": z, "condition": {"label": label}}
        return png_image(call(url, "/api/decode", body)[2])

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, asks))
    for ask, image in zip(asks, together, strict=True):
        assert np.array_equal(image, one(ask))


def test_a_cvae_called_from_python_without_a_condition_takes_the_default(cvae):
    (served,) = serve.load_runs([cvae[0]])
    default = torch.tensor(served.default_condition)
    with torch.inference_mode():
        assert serve.runs.samples_png(served, 4, 1.0, 0, "prior") == serve.runs.samples_png(
            served, 4, 1.0, 0, "prior", default
        )
        z = torch.zeros(3)
        assert serve.runs._decode_batch(served, [(z, None)]) == serve.runs._decode_batch(
            served, [(z, default)]
        )


CVAE_REFUSALS = [
    ("POST", "/api/decode", {"run": "cvae", "z": [0, 0, 0], "condition": {"label": 10}},
     "'condition' label=10: expected an integer from 0 to 9 for label"),
    ("POST", "/api/decode", {"run": "cvae", "z": [0, 0, 0], "condition": {"colour": 1}},
     "'condition' colour=1: expected NAME=VALUE with NAME one of: label"),
    ("POST", "/api/decode", {"run": "cvae", "z": [0, 0, 0], "condition": {"label": 2.5}},
     "expected an integer from 0 to 9"),
    ("POST", "/api/decode", {"run": "cvae", "z": [0, 0, 0], "condition": "label=2"},
     "'condition': expected"),
    ("POST", "/api/decode", {"run": "cvae", "z": [0, 0, 0], "condition": {"a\nb": 1}},
     "'condition' a\\nb=1: expected NAME=VALUE"),  # one line: the newline is escaped
    ("GET", "/api/sample?run=cvae&condition=label=1&condition=label=2", None,
     "label is given a value twice"),
    ("GET", "/api/sample?run=cvae&condition=label", None, "expected NAME=VALUE"),
    ("POST", "/api/reconstruct?run=cvae&condition=label%3D-1", b"", "from 0 to 9"),
]  # fmt: skip


@pytest.mark.parametrize("method, path, body, words", CVAE_REFUSALS)
def test_a_bad_condition_is_a_one_line_400(cvae, method, path, body, words):
    refused(call(cvae[1], path, body, method=method), 400, re.escape(words))


def test_a_condition_for_a_model_without_one_is_refused(server):
    body = {"run": "vae", "z": [0, 0, 0], "condition": {"label": 1}}
    refused(call(server, "/api/decode", body), 400, "'condition': run 'vae' .* is not conditional")
    refused(call(server, "/api/sample?run=vae&condition=label%3D1"), 400, "is not conditional")


def test_a_model_with_discrete_codes_is_refused_at_start(tmp_path):
    from tests.conftest import tiny_config
    from vaelab.config import ConfigError

    cfg = tiny_config("model.name=vq_vae", "model.code_dim=1", "model.codebook_size=16",
                      "data.subset=100", "data.size=8", "train.epochs=1")  # fmt: skip
    run = vaelab.train(cfg, tmp_path / "vq")
    with pytest.raises(ConfigError, match="'vq_vae' decodes discrete codes, which the latent"):
        serve.load_runs([run])
