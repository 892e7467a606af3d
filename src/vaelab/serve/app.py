"""The web app: one page and the JSON/PNG API it uses (docs/serve.md), on Starlette + uvicorn.

The page's three files are read from the package once, at start, and served by exact path:
nothing under any folder is ever looked up from a URL, so no request can reach another file.
Every refusal is a 4xx with a one-line JSON body ``{"error": "..."}``; a request body is read
into memory up to a limit (an upload is never written to disk, not even spooled) and a larger
one is refused while it arrives.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vaelab import conditions, samplers
from vaelab.config import ConfigError
from vaelab.serve import runs as served
from vaelab.serve.runs import BadInput, Engine, ServedRun

log = logging.getLogger("vaelab")

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # an image file
MAX_JSON_BYTES = 256 * 1024  # a JSON body: 128 latents fit in under 4 kB
MAX_SAMPLES = 64  # images per sample grid
MAX_STEPS = 32  # images per interpolation
MAX_TEMPERATURE = 10.0
MAX_LATENT = 1000.0  # |z_j|: latents far beyond the prior's spread overflow no decoder
ASSETS = {  # URL path -> (package file, media type): every file the server serves
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
# The page loads nothing from elsewhere, and the browser is told so: a stray reference to a
# CDN would be blocked rather than fetched.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
     b"connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]  # as a Host header names them


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# -- reading requests ------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, in memory; 413 as soon as it is longer than ``limit`` bytes."""
    too_long = BadInput(413, f"the request body is larger than {limit:,} bytes")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadInput(400, "Content-Length: expected a number of bytes")
        if int(length) > limit:
            raise too_long
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_long
        chunks.append(chunk)
    return b"".join(chunks)


def form_file(body: bytes, boundary: bytes) -> bytes:
    """The first file of a multipart/form-data body (python-multipart's parser, in memory)."""
    parts: list[dict[str, Any]] = []
    header = {"field": b"", "value": b""}

    def begin() -> None:
        parts.append({"headers": {}, "data": []})

    def field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def header_end() -> None:
        parts[-1]["headers"][header["field"].lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    callbacks = {
        "on_part_begin": begin, "on_header_field": field, "on_header_value": value,
        "on_header_end": header_end, "on_part_data": part_data,
    }  # fmt: skip
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except ValueError as err:  # python-multipart's errors are ValueErrors
        raise BadInput(400, f"the multipart body cannot be parsed ({err})") from None
    for part in parts:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"filename" in options:
            return b"".join(part["data"])
    raise BadInput(400, "the multipart body has no file: send the image as a file field")


async def upload(request: Request, limit: int) -> bytes:
    """The uploaded image file: the body itself, or the first file of a multipart form."""
    body = await read_body(request, limit)
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        if not options.get(b"boundary"):
            raise BadInput(400, "Content-Type multipart/form-data without a boundary")
        return form_file(body, options[b"boundary"])
    return body


async def json_body(request: Request) -> dict[str, Any]:
    body = await read_body(request, MAX_JSON_BYTES)
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise BadInput(400, "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadInput(400, "the body: expected a JSON object")
    return value


def number(value: Any, what: str, low: float, high: float) -> float:
    """A finite number in [low, high] (JSON or query text), or a 400 naming ``what``."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadInput(400, f"{what}: expected a number, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadInput(400, f"{what}: expected a finite number, got {str(value)[:40]}")
    if not low <= value <= high:
        raise BadInput(400, f"{what}: expected a number from {low:g} to {high:g}, got {value:g}")
    return float(value)


def integer(value: Any, what: str, low: int, high: int) -> int:
    """An integer in [low, high] (JSON or query text), or a 400 naming ``what``."""
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.lstrip("-").isdigit() and len(text) < 20 else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(400, f"{what}: expected an integer, got {str(value)[:40]!r}")
    if not low <= value <= high:
        raise BadInput(400, f"{what}: expected an integer from {low} to {high}, got {value}")
    return value


def latent(value: Any, run: ServedRun, what: str = "z") -> torch.Tensor:
    """A latent vector of the run's size: latent_dim finite numbers, each |z_j| <= MAX_LATENT."""
    d = run.latent_dim
    if not isinstance(value, list):
        raise BadInput(400, f"'{what}': expected a list of {d} numbers (run '{run.name}')")
    if len(value) != d:
        raise BadInput(
            400, f"'{what}': expected {d} numbers (run '{run.name}' has latent_dim {d}), "
            f"got {len(value)}",
        )  # fmt: skip
    numbers = [number(v, f"'{what}'[{j}]", -MAX_LATENT, MAX_LATENT) for j, v in enumerate(value)]
    return torch.tensor(numbers, dtype=torch.float32)


def condition(value: Any, run: ServedRun) -> torch.Tensor | None:
    """A cvae's condition (V,) from a request: ``{"name": value, ...}`` in a JSON body, or
    ``condition=name=value`` (repeated) in a query; the variables not named keep the run's
    default (``ServedRun.default_condition``). None for a model without conditions, which is
    refused one."""
    given = bool(value) if isinstance(value, dict | list) else value is not None
    if not run.conditions:
        if given:
            what = f"run '{run.name}' ({run.model.cfg.name}) is not conditional"
            raise BadInput(400, f"'condition': {what}")
        return None
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    elif value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInput(400, "'condition': expected {\"NAME\": VALUE, ...}")
    try:
        fixed = conditions.parse(value, run.conditions, "'condition'")
    except ConfigError as err:
        raise BadInput(400, str(err)) from None
    y = list(run.default_condition)
    for i, v in fixed.items():
        y[i] = v
    return torch.tensor(y, dtype=torch.int64)


# -- the app ---------------------------------------------------------------------------------


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response; refuses (400) a request whose Host header is
    not one of ``allowed_hosts`` (None: any)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str] | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            host = Headers(scope=scope).get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts:
                refusal = error(400, f"Host {host[:80]!r}: this server answers to localhost only")
                await refusal(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def read_assets() -> dict[str, tuple[bytes, str]]:
    """URL path -> (bytes, media type) of the page's files, read from the installed package."""
    folder = resources.files("vaelab.serve") / "static"
    return {url: ((folder / name).read_bytes(), kind) for url, (name, kind) in ASSETS.items()}


def create_app(
    runs: list[ServedRun],
    *,
    max_upload: int = MAX_UPLOAD_BYTES,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The Starlette app serving ``runs`` (``serve.runs.load_runs``). ``allowed_hosts``: the
    Host headers accepted (against DNS rebinding when bound to loopback); None: any."""
    by_name = {run.name: run for run in runs}
    assets = read_assets()
    engine = Engine()

    def get_run(name: Any) -> ServedRun:
        if not isinstance(name, str) or not name:
            raise BadInput(400, "'run': expected a run's name (GET /api/runs lists them)")
        if name not in by_name:
            known = ", ".join(by_name)
            raise BadInput(404, f"unknown run {name[:80]!r} (known: {known})")
        return by_name[name]

    def png(content: bytes) -> Response:
        return Response(content, media_type="image/png", headers={"cache-control": "no-store"})

    async def asset(request: Request) -> Response:
        content, kind = assets[request.url.path]
        return Response(content, media_type=kind, headers={"cache-control": "no-cache"})

    from vaelab.report.html import EVAL_KEYS

    listing = {  # the runs are read-only while served: described once
        "runs": [run.describe() for run in runs], "labels": dict(EVAL_KEYS),
        "limits": {"samples": MAX_SAMPLES, "steps": MAX_STEPS, "upload_bytes": max_upload,
                   "temperature": MAX_TEMPERATURE, "latent": MAX_LATENT},
    }  # fmt: skip

    async def list_runs(request: Request) -> JSONResponse:
        return JSONResponse(listing)

    async def decode(request: Request) -> Response:
        body = await json_body(request)
        run = get_run(body.get("run"))
        z, y = latent(body.get("z"), run), condition(body.get("condition"), run)
        return png(await engine.decode(run, z, y))

    async def sample(request: Request) -> Response:
        q = request.query_params
        run = get_run(q.get("run"))
        n = integer(q.get("n", "16"), "'n'", 1, MAX_SAMPLES)
        temperature = number(q.get("temperature", "1"), "'temperature'", 0.0, MAX_TEMPERATURE)
        if temperature <= 0:
            raise BadInput(400, "'temperature': expected a number > 0")
        seed = integer(q.get("seed", "0"), "'seed'", 0, 2**63 - 1)
        sampler = q.get("sampler", "prior")
        if sampler not in samplers.KINDS:
            kinds = " or ".join(samplers.KINDS)
            raise BadInput(400, f"'sampler': expected {kinds}, got {sampler[:40]!r}")
        if sampler == "gmm" and run.mixture is None:
            raise BadInput(
                400, f"run '{run.name}' has no post-hoc sampler fitted to its weights (make one: "
                f"vaelab sample {run.path} --sampler gmm --out FILE.png)",
            )  # fmt: skip
        y = condition(q.getlist("condition"), run)
        return png(await engine.call(served.samples_png, run, n, temperature, seed, sampler, y))

    async def image_of(request: Request, run: ServedRun) -> torch.Tensor:
        return served.upload_to_tensor(await upload(request, max_upload), run)

    async def reconstruct(request: Request) -> Response:
        run = get_run(request.query_params.get("run"))
        run.need_encoder("reconstruct an image")
        y = condition(request.query_params.getlist("condition"), run)
        x = await image_of(request, run)
        return png(await engine.call(served.reconstruct_png, run, x, y))

    async def encode(request: Request) -> JSONResponse:
        run = get_run(request.query_params.get("run"))
        run.need_encoder("encode an image")
        y = condition(request.query_params.getlist("condition"), run)
        x = await image_of(request, run)
        return JSONResponse(await engine.call(served.encode_upload, run, x, y))

    async def endpoint_latent(run: ServedRun, spec: Any, what: str) -> torch.Tensor:
        if isinstance(spec, dict) and set(spec) == {"z"}:
            return latent(spec["z"], run, f"{what}.z")
        if isinstance(spec, dict) and set(spec) == {"val"}:
            run.need_encoder("encode validation images")
            val = run.need_val()
            index = integer(spec["val"], f"'{what}.val'", 0, len(val) - 1)
            return await engine.call(served.val_latent, run, index)
        raise BadInput(400, f'\'{what}\': expected {{"z": [...]}} or {{"val": INDEX}}')

    async def interpolate(request: Request) -> Response:
        body = await json_body(request)
        run = get_run(body.get("run"))
        steps = integer(body.get("steps", 8), "'steps'", 2, MAX_STEPS)
        y = condition(body.get("condition"), run)
        a = await endpoint_latent(run, body.get("from"), "from")
        b = await endpoint_latent(run, body.get("to"), "to")
        return png(await engine.call(served.interpolation_png, run, a, b, steps, y))

    async def val_image(request: Request) -> Response:
        run = get_run(request.query_params.get("run"))
        val = run.need_val()
        index = integer(request.query_params.get("index", ""), "'index'", 0, len(val) - 1)
        return png(await engine.call(served.val_png, run, index))

    async def val_latent(request: Request) -> JSONResponse:
        run = get_run(request.query_params.get("run"))
        run.need_encoder("encode validation images")
        val = run.need_val()
        index = integer(request.query_params.get("index", ""), "'index'", 0, len(val) - 1)
        z = await engine.call(served.val_latent, run, index)
        return JSONResponse({"z": z.tolist()})

    async def codes(request: Request) -> JSONResponse:
        run = get_run(request.query_params.get("run"))
        return JSONResponse(await engine.call(served.val_codes, run))

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, BadInput):
            return error(exc.status, str(exc))
        assert isinstance(exc, HTTPException)
        what = {404: "no such page or API endpoint (see docs/serve.md)", 405: "method not allowed"}
        return error(exc.status_code, what.get(exc.status_code, str(exc.detail)))

    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error(f"{request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return error(500, f"internal error ({type(exc).__name__}); the server goes on")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.close()

    routes = [Route(url, asset) for url in ASSETS] + [
        Route("/api/runs", list_runs),
        Route("/api/decode", decode, methods=["POST"]),
        Route("/api/sample", sample),
        Route("/api/reconstruct", reconstruct, methods=["POST"]),
        Route("/api/encode", encode, methods=["POST"]),
        Route("/api/interpolate", interpolate, methods=["POST"]),
        Route("/api/val", val_image),
        Route("/api/val/latent", val_latent),
        Route("/api/codes", codes),
    ]
    middleware = [Middleware(SecurityHeaders, allowed_hosts=allowed_hosts)]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={BadInput: refused, HTTPException: refused, Exception: failed},
        lifespan=lifespan,
    )


# -- serving ---------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); OSError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that name it, and
    # without it each response waits ~40 ms for a delayed ACK (Nagle's algorithm).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _server(app: Starlette) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    return uvicorn.Server(config)


def app_for(runs: list[ServedRun], host: str, max_upload: int = MAX_UPLOAD_BYTES) -> Starlette:
    """The app, accepting only loopback Host headers when it listens on a loopback address (a
    web page elsewhere cannot reach it by DNS rebinding)."""
    hosts = [*LOOPBACK_HOSTS, host] if is_loopback(host) else None  # 127.0.0.2 too
    return create_app(runs, max_upload=max_upload, allowed_hosts=hosts)


def serve(run_dirs: list[str | Path], host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the runs and serve the page until interrupted (Ctrl+C)."""
    runs = served.load_runs(run_dirs)
    sock = bind(host, port)
    names = ", ".join(run.name for run in runs)
    print(
        f"vaelab serve: {names} at {address(sock)} (open it in a browser; Ctrl+C stops)", flush=True
    )
    if not is_loopback(host):
        print("vaelab serve: listening beyond this machine: anyone who can reach it can use it")
    with contextlib.closing(sock):
        _server(app_for(runs, host)).run(sockets=[sock])


@contextlib.contextmanager
def serving(
    runs: list[ServedRun],
    host: str = "127.0.0.1",
    port: int = 0,
    max_upload: int = MAX_UPLOAD_BYTES,
) -> Iterator[str]:
    """Serve ``runs`` from a thread of this process for the block; yields the address. For
    scripts and tests; the server stops when the block ends."""
    sock = bind(host, port)
    server = _server(app_for(runs, host, max_upload))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield address(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
