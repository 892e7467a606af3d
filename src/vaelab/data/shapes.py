"""``shapes``: procedural dSprites-style sprites with known generative factors.

dSprites (Matthey et al. 2017, https://github.com/deepmind/dsprites-dataset) is the standard
benchmark for disentanglement because every image is fully described by five independent
factors. Rather than download its .npz, this module renders an equivalent set with numpy, so the
data exist wherever vaelab is installed and the true factors of every image are known exactly.

64x64 binary images (0/255, one channel) of 3 shapes x 6 scales x 40 orientations x 32 x 32
positions = 737,280 images, factors in dSprites' order: shape (square, ellipse, heart), scale
(0.5 .. 1.0), orientation (40 steps over [0, 2*pi), counter-clockwise on screen), pos_x (left
to right), pos_y (top to bottom). Rendering is deterministic: a pixel is on when its centre
lies inside the rotated, scaled and shifted shape (no anti-aliasing, no noise). Orientations
are not folded by the shapes' symmetries: a square at orientation k and k + 10 (an ellipse at
k and k + 20) is the same picture up to a few outline pixels, so no model can tell those
orientations apart; disentanglement scores for orientation carry that ceiling.
"""

from __future__ import annotations

import math

import numpy as np

from vaelab import progress as progress_bars
from vaelab.config import DataConfig
from vaelab.data.base import DataError, ImageDataset, Splits

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPE_NAMES = ("square", "ellipse", "heart")
SIZE = 64  # pixels per side
N_IMAGES = math.prod(FACTOR_SIZES)  # 737,280

# Every shape is drawn inside the unit disk of its own (u, v) frame, so a sprite of scale s
# never reaches further than s * RADIUS pixels from its centre, whatever its orientation. The
# centres then range over [MARGIN, SIZE - MARGIN]: the largest sprite touches no border. Both
# ends are whole pixels, so the sprites at pos 0 and pos 31 are exact shifted copies.
RADIUS = 10.0
MARGIN = RADIUS + 1.0
HALF_SIDE = 1 / math.sqrt(2)  # the square's corners lie on the unit circle
# The implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 spans x in [-1.14, 1.14], y in
# [-1, 1.24]; its smallest enclosing circle has radius 1.25 around (0, 0.25).
HEART_RADIUS, HEART_SHIFT = 1.25, 0.25
CHUNK = 1024  # images rendered at once: big enough for numpy, small enough for the caches


def factor_values() -> tuple[np.ndarray, ...]:
    """The real value behind each factor index, in FACTOR_NAMES order: shape index, scale,
    orientation in radians, pos_x and pos_y in [0, 1] (dSprites' ``latents_values``)."""
    return (
        np.arange(FACTOR_SIZES[0], dtype=np.float64),
        np.linspace(0.5, 1.0, FACTOR_SIZES[1]),
        2 * np.pi * np.arange(FACTOR_SIZES[2]) / FACTOR_SIZES[2],
        np.linspace(0.0, 1.0, FACTOR_SIZES[3]),
        np.linspace(0.0, 1.0, FACTOR_SIZES[4]),
    )


def all_factors() -> np.ndarray:
    """(737280, 5) int64: every factor combination once, the last factor varying fastest (the
    order of dSprites' arrays), so row i is ``np.unravel_index(i, FACTOR_SIZES)``."""
    grids = np.indices(FACTOR_SIZES, dtype=np.int64)  # (5, 3, 6, 40, 32, 32)
    return grids.reshape(len(FACTOR_SIZES), -1).T.copy()


def sample_factors(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 5) int64: each factor drawn uniformly and independently (with repetition), as the
    disentanglement metrics sample their images."""
    return np.stack([rng.integers(0, size, n) for size in FACTOR_SIZES], axis=1)


def _check_factors(factors: np.ndarray) -> np.ndarray:
    factors = np.asarray(factors)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_SIZES):
        raise DataError(f"shapes factors: expected (N, {len(FACTOR_SIZES)}), got {factors.shape}")
    if not np.issubdtype(factors.dtype, np.integer):
        raise DataError(f"shapes factors: expected integer indices, got {factors.dtype}")
    if len(factors) and ((factors < 0).any() or (factors >= np.array(FACTOR_SIZES)).any()):
        raise DataError(f"shapes factors: indices must lie in 0 .. size - 1 for {FACTOR_SIZES}")
    return factors.astype(np.int64)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v) of the shape's unit frame (v pointing up) lie inside the shape."""
    if shape == 0:  # square
        return (np.abs(u) <= HALF_SIDE) & (np.abs(v) <= HALF_SIDE)
    if shape == 1:  # ellipse, long axis along u, aspect 2:1
        return u * u + 4 * (v * v) <= 1
    x = HEART_RADIUS * u  # heart, tip down
    y = HEART_RADIUS * v + HEART_SHIFT
    x2, q = x * x, x * x + y * y - 1
    return q * q * q <= x2 * (y * y * y)


def _render_shape(shape: int, factors: np.ndarray) -> np.ndarray:
    """(N, 64, 64) bool for rows of one shape. Each pixel centre is mapped into the shape's
    frame (translate, rotate by -angle, divide by the scale); the rotation is separable in x and
    y, so the per-pixel work is two additions and the inside test."""
    _, scales, angles, positions_x, positions_y = factor_values()
    span = SIZE - 2 * MARGIN
    cx = MARGIN + span * positions_x[factors[:, 3]]
    cy = MARGIN + span * positions_y[factors[:, 4]]
    theta = angles[factors[:, 2]]
    inv = 1.0 / (RADIUS * scales[factors[:, 1]])
    cos, sin = (np.cos(theta) * inv)[:, None], (np.sin(theta) * inv)[:, None]
    centres = np.arange(SIZE) + 0.5
    dx = centres[None, :] - cx[:, None]  # (N, W): right of the centre
    dy = cy[:, None] - centres[None, :]  # (N, H): above the centre (rows grow downward)
    # Per-pixel arrays in float32: half the memory traffic of float64, and a pixel's verdict
    # only changes for points within ~1e-6 pixel of the outline.
    u = (cos * dx).astype(np.float32)[:, None, :] + (sin * dy).astype(np.float32)[:, :, None]
    v = (cos * dy).astype(np.float32)[:, :, None] - (sin * dx).astype(np.float32)[:, None, :]
    return _inside(shape, u, v)


def render(factors: np.ndarray) -> np.ndarray:
    """(N, 64, 64) uint8 images, 0 or 255, of the factor index rows ``factors`` (N, 5).

    The same rows always give the same pixels: nothing here is random.
    """
    factors = _check_factors(factors)
    out = np.zeros((len(factors), SIZE, SIZE), np.uint8)
    for start in range(0, len(factors), CHUNK):
        part = factors[start : start + CHUNK]
        for shape in np.unique(part[:, 0]):
            rows = np.flatnonzero(part[:, 0] == shape)
            out[start + rows] = _render_shape(int(shape), part[rows]) * np.uint8(255)
    return out


def build(cfg: DataConfig, progress: bool = True) -> Splits:
    """Render ``cfg.subset`` distinct factor combinations (0: all 737,280) and split them.

    The subset and the train/val split are both drawn from ``cfg.seed``, so a run is
    reproducible from its config; the images are rendered into memory (3 GB for the full set).
    """
    if cfg.size not in (0, SIZE):
        raise DataError(f"data.size={cfg.size}: shapes are {SIZE}x{SIZE}; use 0 or {SIZE}")
    if cfg.channels not in (0, 1):
        raise DataError(f"data.channels={cfg.channels}: shapes are grey (1 channel); use 0 or 1")
    if cfg.subset == 1 or cfg.subset > N_IMAGES:  # one image leaves nothing to train on
        raise DataError(
            f"data.subset={cfg.subset}: shapes has {N_IMAGES} images; use 0 (all) or 2 .. that"
        )
    rng = np.random.default_rng(cfg.seed)
    if cfg.subset:
        flat = np.sort(rng.choice(N_IMAGES, size=cfg.subset, replace=False))
        factors = np.stack(np.unravel_index(flat, FACTOR_SIZES), axis=1).astype(np.int64)
    else:
        factors = all_factors()
    n = len(factors)
    images = np.empty((n, SIZE, SIZE, 1), np.uint8)
    step = 16 * CHUNK  # a bar update every few hundred milliseconds
    with progress_bars.bar(n, "rendering shapes", progress, unit="img") as bar:
        for start in range(0, n, step):
            images[start : start + step, ..., 0] = render(factors[start : start + step])
            bar.update(min(step, n - start))
    order = rng.permutation(n)
    n_val = max(1, round(n * cfg.val_fraction))
    full = ImageDataset(
        images, factors=factors, factor_names=FACTOR_NAMES, factor_sizes=FACTOR_SIZES
    )
    info = {"images": n, "factor_names": FACTOR_NAMES, "factor_sizes": FACTOR_SIZES}
    return Splits(
        full.subset(np.sort(order[n_val:])), full.subset(np.sort(order[:n_val])), info=info
    )
