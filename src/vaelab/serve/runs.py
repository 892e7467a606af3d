"""The runs a server explores: loaded once, read-only, with everything the page shows of them.

A ``ServedRun`` holds a run's model in the form ``speed.for_sampling`` gives (eval mode, no
parameter gradients, batch norms folded: the same function, faster), its latent dimensions
ordered by activity, its evaluation numbers, its post-hoc sampler when one was fitted to its
current weights, and its validation images when the data can be read here. Nothing is computed
differently from the rest of vaelab: the KL per dimension is the one ``vaelab evaluate`` wrote
(``eval/val.json``'s ``kl_per_dim``) or, for a run not yet evaluated, the choice
``vaelab traverse`` makes (``report.pictures.active_dimensions``); uploads are decoded, cropped
and resized by the function the data sources use (``data.images.load_image``).

``Engine`` runs every model call of the server on one thread, so torch's own threads are never
shared between requests, and decodes the latents of concurrent requests as one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vaelab import conditions, data, rundir, samplers, speed
from vaelab.checkpoint import CheckpointError, load, read_json, run_config
from vaelab.config import ConfigError, RunConfig
from vaelab.data.base import to_float
from vaelab.data.celeba import DEFAULT_CROP as CELEBA_CROP
from vaelab.data.images import DECODE_ERRORS, load_image
from vaelab.models.base import GenerativeModel
from vaelab.report import pictures
from vaelab.report.draw import run_split
from vaelab.report.figures import image_grid, to_uint8

T = TypeVar("T")
Queued = tuple["ServedRun", Tensor, Tensor | None, "asyncio.Future[bytes]"]  # a decode waiting

# What an upload may be: the formats vaelab's data sources read (data.images.EXTENSIONS).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_UPLOAD_PIXELS = 40_000_000  # refused before decoding: a small file can hold a huge image
VAL_SHOWN = 16  # validation images offered to pick from, spread over the split
CODES_SHOWN = 500  # validation codes drawn in the page's latent-space scatter
PNG_LEVEL = 1  # zlib level: a 64x64 image compresses in ~0.1 ms, 2-3x smaller than level 0


class BadInput(ValueError):
    """A request the server refuses: ``status`` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServedRun:
    """One run as the server shows it (see the module's docstring)."""

    name: str
    path: Path
    model: GenerativeModel
    cfg: RunConfig
    order: list[int]  # latent dimensions, most active first
    kl: list[float] | None  # KL per dimension (nats), in dimension order, where known
    order_source: str
    evaluation: dict[str, dict[str, Any]]  # eval/<name>.json -> its numbers
    mixture: samplers.LatentMixture | None
    val: data.ImageDataset | None
    val_note: str  # why there are no validation images, or where they come from
    default_condition: list[int]  # a cvae's condition where a request gives none ([] for others)
    codes: np.ndarray | None = field(default=None, repr=False)  # cached posterior means

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.model.shape)  # type: ignore[return-value]

    @property
    def latent_dim(self) -> int:
        return self.model.cfg.latent_dim

    @property
    def has_encoder(self) -> bool:
        return self.model.has_encoder

    @property
    def conditions(self) -> conditions.Variables:
        """A conditional model's variables, (name, number of values) each; () for others."""
        return self.model.conditions

    def condition(self, y: Tensor | None) -> Tensor:
        """y (V,), or the run's default condition where none is given."""
        return torch.tensor(self.default_condition, dtype=torch.int64) if y is None else y

    def under(self, y: Tensor | None, n: int) -> contextlib.AbstractContextManager[None]:
        """Give a conditional model the condition y (V,) (None: the default) for a batch of n;
        nothing for others."""
        return conditions.held(self.model, self.condition(y) if self.conditions else None, n)

    @property
    def upload_crop(self) -> int:
        """The centre crop an upload gets: the run's data.crop, or its source's default (148
        for celeba; 0, the short side's square, for the others), as in training."""
        crop = self.cfg.data.crop
        return crop or (CELEBA_CROP if self.cfg.data.name == "celeba" else 0)

    def val_shown(self) -> list[int]:
        return [] if self.val is None else pictures.spread(self.val, VAL_SHOWN).tolist()

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/runs`` says of the run."""
        c, h, w = self.shape
        dims = [{"index": j, "kl": None if self.kl is None else self.kl[j]} for j in self.order]
        return {
            "name": self.name,
            "model": self.model.cfg.name,
            "latent_dim": self.latent_dim,
            "shape": {"channels": c, "height": h, "width": w},
            "has_encoder": self.has_encoder,
            "dims": dims,
            "dims_order": self.order_source,
            "evaluation": self.evaluation,
            "condition_on": self.model.condition_on or None,
            "conditions": [
                {"name": name, "size": size, "default": default}
                for (name, size), default in zip(
                    self.conditions, self.default_condition, strict=True
                )
            ],
            "samplers": ["prior"] + (["gmm"] if self.mixture is not None else []),
            "gmm": None if self.mixture is None else self.mixture.info,
            "val": {
                "count": 0 if self.val is None else len(self.val),
                "shown": self.val_shown(),
                "note": self.val_note,
            },
            "upload": {
                "crop": self.upload_crop,
                "size": h,
                "channels": c,
                "binarize": self.cfg.data.binarize,
            },
        }

    def need_encoder(self, what: str) -> None:
        if not self.has_encoder:
            raise BadInput(
                400,
                f"run '{self.name}' ({self.model.cfg.name}) has no encoder, so it cannot {what}; "
                "its decoder still draws from /api/decode and /api/sample",
            )

    def need_val(self) -> data.ImageDataset:
        if self.val is None:
            raise BadInput(400, f"run '{self.name}': no validation images here ({self.val_note})")
        return self.val


# -- loading ---------------------------------------------------------------------------------


def run_names(paths: list[Path]) -> list[str]:
    """A short, unique name per run: its folder's name, with parent folders where two share it."""
    names = [p.name or str(p) for p in paths]
    for depth in (2, 3):
        if len(set(names)) == len(names):
            break
        names = ["/".join(p.parts[-depth:]) for p in paths]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _finite(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities (which JSON cannot hold) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value


def read_evaluation(run: Path) -> dict[str, dict[str, Any]]:
    """Every eval/<name>.json of a run (``vaelab evaluate``, ``gap``, ``quality``), as written."""
    folder = run / rundir.EVAL
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        result = read_json(path)
        if not isinstance(result, dict):
            raise CheckpointError(f"'{path}': expected a mapping of metrics")
        out[path.stem] = _finite(result)
    return out


def dimension_order(
    model: GenerativeModel, evaluation: dict[str, dict[str, Any]], val: data.ImageDataset | None
) -> tuple[list[int], list[float] | None, str]:
    """The latent dimensions, most active first; their KL (nats) where known; and where the
    order comes from."""
    d = model.cfg.latent_dim
    for split in ("val", "test"):
        kl = evaluation.get(split, {}).get("kl_per_dim")
        if isinstance(kl, list) and len(kl) == d and all(isinstance(v, int | float) for v in kl):
            order = sorted(range(d), key=lambda j: -kl[j])
            return order, [float(v) for v in kl], f"KL per dimension, eval/{split}.json"
    if not model.has_encoder:
        return list(range(d)), None, "no encoder: every dimension is equally unused"
    if val is None:
        return list(range(d)), None, "not evaluated and no validation images: index order"
    order = pictures.active_dimensions(model, val, d)
    n = min(500, len(val))  # pictures.active_dimensions' default
    return order, None, f"mean KL over {n} validation images (as vaelab traverse chooses)"


def _validation(run: Path, model: GenerativeModel) -> tuple[data.ImageDataset | None, str]:
    """The run's validation split when its data can be read here and has the model's shape."""
    try:
        val = run_split(run, "val")
    except (data.DataError, CheckpointError, OSError) as err:
        return None, f"the run's data cannot be read here: {str(err).splitlines()[0][:200]}"
    if val.shape != tuple(model.shape):
        return None, f"the run's data gives images of shape {list(val.shape)}, the model's is " + (
            f"{list(model.shape)}"
        )
    return val, f"the run's validation split ({len(val)} images)"


def _mixture(run: Path, model: GenerativeModel) -> samplers.LatentMixture | None:
    """The run's post-hoc sampler with the most components, fitted to its current weights
    (``vaelab sample --sampler gmm`` fits and saves it; the server never fits one)."""
    folder = run / rundir.SAMPLERS
    if not model.has_encoder or not folder.is_dir():
        return None
    sizes = [int(p.stem[4:]) for p in folder.glob("gmm_*.safetensors") if p.stem[4:].isdigit()]
    for k in sorted(sizes, reverse=True):
        mixture = samplers.saved_gmm(run, model, k)
        if mixture is not None:
            return mixture
    return None


def load_run(path: str | Path, name: str) -> ServedRun:
    """A run ready to serve (the model loaded the safe way: ``vaelab.load``, no pickle)."""
    path = Path(path)
    model = load(path)  # first: it names what is missing from a folder that is no run
    cfg = run_config(path)
    if not model.continuous_latent:
        raise ConfigError(
            f"run '{path}': model '{model.cfg.name}' decodes discrete codes, which the latent "
            "explorer has no sliders for; it serves models with a continuous latent"
        )
    fast = speed.for_sampling(model, cfg.train.channels_last)
    evaluation = read_evaluation(path)
    val, note = _validation(path, model)
    with torch.inference_mode():
        order, kl, source = dimension_order(model, evaluation, val)
    default: list[int] = []  # a cvae's condition where a request names none
    if model.conditions:
        default = conditions.typical(val, model.conditions, model.condition_on)
    mixture = _mixture(path, model)
    return ServedRun(
        name, path, fast, cfg, order, kl, source, evaluation, mixture, val, note, default
    )


def load_runs(paths: list[str | Path]) -> list[ServedRun]:
    """Every run given, named uniquely (``run_names``)."""
    resolved = [Path(p) for p in paths]
    return [load_run(p, n) for p, n in zip(resolved, run_names(resolved), strict=True)]


# -- images ----------------------------------------------------------------------------------


def png(array: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes, at a low compression level (speed over a few bytes)."""
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def grid_png(images: Tensor, nrow: int) -> bytes:
    """Images (N, C, H, W) in [0, 1] as one PNG grid of ``nrow`` columns (the report's grid)."""
    return png(image_grid(images, nrow))


def upload_to_tensor(payload: bytes, run: ServedRun) -> Tensor:
    """An uploaded image file as the run's model sees its data, (1, C, H, W) in [0, 1]:
    turned upright by its EXIF tag, centre-cropped to ``run.upload_crop`` (0: the short side's
    square), resized with Lanczos to the run's size, grey or RGB as the run's channels
    (transparency onto white), thresholded for a binarized run. Never written to disk."""
    if not payload:
        raise BadInput(400, "the upload is empty: expected an image file (PNG, JPEG, WebP, BMP)")
    try:
        with Image.open(io.BytesIO(payload), formats=UPLOAD_FORMATS) as img:
            width, height = img.size
    except DECODE_ERRORS:
        raise BadInput(
            415, "the upload is not an image vaelab reads (expected PNG, JPEG, WebP or BMP)"
        ) from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise BadInput(
            413, f"the image is {width}x{height} pixels, expected at most {MAX_UPLOAD_PIXELS:,}"
        )
    c, size, _ = run.shape
    try:
        array = load_image(io.BytesIO(payload), size, run.upload_crop, c)  # type: ignore[arg-type]
    except DECODE_ERRORS as err:
        raise BadInput(415, f"the image cannot be decoded ({type(err).__name__})") from None
    return to_float(torch.from_numpy(array.copy())[None], run.cfg.data.binarize)


# -- the model thread ------------------------------------------------------------------------


class Engine:
    """Every model call of the server, on one thread, in inference mode.

    ``decode`` queues a latent and waits; the thread takes every latent queued for a run at
    once and decodes them as one batch, so concurrent slider moves (or clients) share a forward
    pass and add no wait when the server is idle. ``call`` runs any other model work (samples,
    encodings) on the same thread, between batches.
    """

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vaelab-model")
        self.queue: asyncio.Queue[Queued] | None = None
        self.task: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the model thread, under ``torch.inference_mode``."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, _inference, fn, args)

    async def decode(self, run: ServedRun, z: Tensor, y: Tensor | None = None) -> bytes:
        """The PNG of the decoder's mean image for one latent z (d,) (under a cvae's
        condition y (V,))."""
        if self.queue is None or self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._batches())
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        await self.queue.put((run, z, y, future))
        return await future

    async def _batches(self) -> None:
        assert self.queue is not None
        while True:
            first = await self.queue.get()
            items = [first]
            while not self.queue.empty() and len(items) < self.max_batch:
                items.append(self.queue.get_nowait())
            for run in {id(item[0]): item[0] for item in items}.values():
                mine = [item for item in items if item[0] is run]
                try:
                    pngs = await self.call(_decode_batch, run, [(z, y) for _, z, y, _ in mine])
                except Exception as err:  # each waiting request gets the error
                    for *_, future in mine:
                        if not future.done():
                            future.set_exception(err)
                    continue
                for (*_, future), data_png in zip(mine, pngs, strict=True):
                    if not future.done():  # a client that went away cancelled its future
                        future.set_result(data_png)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _inference(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    with torch.inference_mode():
        return fn(*args)


def _decode_batch(run: ServedRun, latents: list[tuple[Tensor, Tensor | None]]) -> list[bytes]:
    param = next(run.model.parameters())
    z = torch.stack([z for z, _ in latents]).to(param.device, param.dtype)  # (B, d)
    under = contextlib.nullcontext()
    if run.conditions:  # each latent with its own request's condition
        under = run.model.given(torch.stack([run.condition(y) for _, y in latents]))
    with under:
        return [png(a) for a in to_uint8(run.model.decode(z))]


def samples_png(
    run: ServedRun, n: int, temperature: float, seed: int, sampler: str, y: Tensor | None = None
) -> bytes:
    """A grid of n samples (``report.pictures.samples``: the prior, or the run's mixture), all
    under a cvae's condition y (V,) (None: the default)."""
    mixture = run.mixture if sampler == "gmm" else None
    y = run.condition(y) if run.conditions else None
    images = pictures.samples(run.model, n, temperature, seed, mixture, condition=y)
    return grid_png(images, math.ceil(math.sqrt(n)))


def val_png(run: ServedRun, index: int) -> bytes:
    return png(run.need_val().uint8(np.array([index]))[0])


def val_latent(run: ServedRun, index: int) -> Tensor:
    """The posterior mean of validation image ``index``, (d,) (a cvae's given the image's own
    condition)."""
    return pictures.latents(run.model, run.need_val(), np.array([index]))[0].float().cpu()


def encode_upload(run: ServedRun, x: Tensor, y: Tensor | None = None) -> dict[str, Any]:
    """The posterior of an upload (given a cvae's condition y (V,)): its mean and standard
    deviation per dimension (for iaf_vae, its flow's base Gaussian), and the image as the model
    saw it (a PNG data URI)."""
    import base64

    param = next(run.model.parameters())
    with run.under(y, 1):
        q = run.model.encode(x.to(param.device, param.dtype))
    seen = base64.b64encode(png(to_uint8(x)[0])).decode("ascii")
    return {
        "z": q.mode()[0].float().cpu().tolist(),
        "std": q.std[0].float().cpu().tolist(),
        "input_png": f"data:image/png;base64,{seen}",
    }


def reconstruct_png(run: ServedRun, x: Tensor, y: Tensor | None = None) -> bytes:
    """The decoder's mean at the posterior mean (``GenerativeModel.reconstruct``), under a
    cvae's condition y (V,) (encoder and decoder both)."""
    param = next(run.model.parameters())
    with run.under(y, 1):
        return png(to_uint8(run.model.reconstruct(x.to(param.device, param.dtype)))[0])


def interpolation_png(
    run: ServedRun, a: Tensor, b: Tensor, steps: int, y: Tensor | None = None
) -> bytes:
    """``steps`` decoded points on the line from latent a to latent b, both ends included, as
    one row (the line ``vaelab interpolate`` walks), under a cvae's condition y (V,)."""
    t = torch.linspace(0, 1, steps)[:, None]  # (S, 1)
    path = a[None] * (1 - t) + b[None] * t  # (S, d)
    param = next(run.model.parameters())
    with run.under(y, steps):
        return grid_png(run.model.decode(path.to(param.device, param.dtype)), steps)


def val_codes(run: ServedRun) -> dict[str, Any]:
    """Posterior means of up to CODES_SHOWN validation images on the two most active
    dimensions (``evaluate.posterior_means``, cached), for the page's scatter."""
    from vaelab.evaluate import posterior_means

    run.need_encoder("encode validation images")
    val = run.need_val()
    if run.codes is None:
        run.codes = posterior_means(run.model, val.subset(pictures.spread(val, CODES_SHOWN)))
    dims = run.order[:2]
    return {"dims": dims, "points": run.codes[:, dims].astype(np.float64).round(4).tolist()}
