"""The procedural dSprites-style ``shapes`` source: geometry of each factor, order, splits."""

import math

import numpy as np
import pytest

from vaelab import data
from vaelab.config import load_config
from vaelab.data import DataError, shapes

SQUARE, ELLIPSE, HEART = 0, 1, 2
LARGEST = shapes.FACTOR_SIZES[1] - 1
MIDDLE = 15  # a position index near the centre of the frame


def config(*overrides):
    return load_config(overrides=["data.name=shapes", *overrides]).data


def one(shape=SQUARE, scale=LARGEST, orientation=0, pos_x=MIDDLE, pos_y=MIDDLE):
    """The image (64, 64) of one factor row."""
    return shapes.render(np.array([[shape, scale, orientation, pos_x, pos_y]]))[0]


def centre_of_mass(image):
    """(column, row) of the pixels that are on."""
    rows, cols = np.nonzero(image)
    return cols.mean(), rows.mean()


def test_render_is_binary_uint8_and_deterministic():
    factors = shapes.sample_factors(300, np.random.default_rng(0))
    images = shapes.render(factors)
    assert images.shape == (300, 64, 64) and images.dtype == np.uint8
    assert set(np.unique(images)) == {0, 255}
    assert (images > 0).sum(axis=(1, 2)).min() > 0  # every sprite is drawn
    assert np.array_equal(shapes.render(factors), images)
    # A row renders the same alone as inside a batch of mixed shapes.
    for i in (0, 77, 299):
        assert np.array_equal(shapes.render(factors[i : i + 1])[0], images[i])


def test_render_rejects_bad_factor_rows():
    with pytest.raises(DataError, match=r"expected \(N, 5\)"):
        shapes.render(np.zeros((2, 4), np.int64))
    with pytest.raises(DataError, match="must lie in"):
        shapes.render(np.array([[3, 0, 0, 0, 0]]))
    with pytest.raises(DataError, match="must lie in"):
        shapes.render(np.array([[0, 0, 0, 0, -1]]))


def test_all_factors_lists_every_combination_last_factor_fastest():
    factors = shapes.all_factors()
    assert factors.shape == (737_280, 5) and factors.dtype == np.int64
    flat = np.ravel_multi_index(factors.T, shapes.FACTOR_SIZES)
    assert np.array_equal(flat, np.arange(737_280))  # row i is unravel_index(i): all distinct
    assert factors[:3].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2]]
    assert factors[32].tolist() == [0, 0, 0, 1, 0]
    assert factors[-1].tolist() == [2, 5, 39, 31, 31]
    assert shapes.FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert shapes.FACTOR_SIZES == (3, 6, 40, 32, 32)


def test_sample_factors_are_seeded_and_in_range():
    a = shapes.sample_factors(5000, np.random.default_rng(1))
    assert a.shape == (5000, 5)
    assert np.array_equal(a, shapes.sample_factors(5000, np.random.default_rng(1)))
    assert not np.array_equal(a, shapes.sample_factors(5000, np.random.default_rng(2)))
    assert a.min(axis=0).tolist() == [0] * 5
    assert a.max(axis=0).tolist() == [s - 1 for s in shapes.FACTOR_SIZES]


def test_positions_move_the_centre_of_mass():
    span = 64 - 2 * shapes.MARGIN  # pixels between the first and last centre
    x0, y0 = centre_of_mass(one(pos_x=0))
    x1, y1 = centre_of_mass(one(pos_x=31))
    assert x1 - x0 == pytest.approx(span, abs=0.5) and y1 == pytest.approx(y0, abs=0.01)
    x0, y0 = centre_of_mass(one(pos_y=0))
    x1, y1 = centre_of_mass(one(pos_y=31))
    assert y1 - y0 == pytest.approx(span, abs=0.5) and x1 == pytest.approx(x0, abs=0.01)
    # Every step moves the sprite right (pos_x) or down (pos_y).
    xs = [centre_of_mass(one(shape=HEART, pos_x=k))[0] for k in range(32)]
    ys = [centre_of_mass(one(shape=HEART, pos_y=k))[1] for k in range(32)]
    assert np.all(np.diff(xs) > 0.5) and np.all(np.diff(ys) > 0.5)


@pytest.mark.parametrize("shape", [SQUARE, ELLIPSE, HEART])
def test_scale_grows_the_area_as_its_square(shape):
    counts = [(one(shape=shape, scale=k) > 0).sum() for k in range(6)]
    assert np.all(np.diff(counts) > 0)
    assert counts[-1] / counts[0] == pytest.approx(4.0, rel=0.1)  # scale 1.0 against 0.5


def test_the_three_shapes_have_their_areas():
    # Areas in pixels at scale 1 (radius R = 10): square of half-side R / sqrt(2), ellipse with
    # semi-axes R and R / 2, and the implicit heart's area 3.66 shrunk by 1.25^2.
    r = shapes.RADIUS
    expected = [2 * r * r, math.pi * r * r / 2, 3.6595 / 1.25**2 * r * r]
    counts = [int((one(shape=s) > 0).sum()) for s in (SQUARE, ELLIPSE, HEART)]
    assert counts == pytest.approx(expected, rel=0.04)
    assert len(set(counts)) == 3 and min(np.diff(sorted(counts))) > 20


def test_orientation_turns_the_sprite_counter_clockwise():
    def spread(image):  # covariance of (column, row) of the pixels that are on
        rows, cols = np.nonzero(image)
        return np.cov(cols, rows)

    flat, tall = spread(one(shape=ELLIPSE)), spread(one(shape=ELLIPSE, orientation=10))
    assert flat[0, 0] > 3 * flat[1, 1] and tall[1, 1] > 3 * tall[0, 0]  # long axis: x, then y
    # An eighth of a turn: the long axis points up-right, i.e. rows fall as columns grow.
    assert spread(one(shape=ELLIPSE, orientation=5))[0, 1] < -5
    assert spread(one(shape=ELLIPSE, orientation=15))[0, 1] > 5


@pytest.mark.parametrize(("shape", "period"), [(SQUARE, 10), (ELLIPSE, 20), (HEART, 40)])
def test_orientation_changes_the_image_up_to_the_shape_symmetry(shape, period):
    rows = [[shape, LARGEST, k, MIDDLE, MIDDLE] for k in range(40)]
    images = shapes.render(np.array(rows)) > 0
    differ = (images[:, None] != images[None, :]).sum(axis=(2, 3))  # (40, 40) pixels
    for a in range(40):
        for b in range(a + 1, 40):
            if (b - a) % period == 0:
                assert differ[a, b] <= 4, (a, b)  # a symmetry: the same picture
            else:
                assert differ[a, b] > 4, (a, b)


def test_the_heart_points_down_then_up_after_half_a_turn():
    def mass_below_centre(image):  # share of the on pixels below the sprite's row centre
        rows = np.nonzero(image)[0]
        return (rows > (rows.min() + rows.max()) / 2).mean()

    assert mass_below_centre(one(shape=HEART)) < 0.45  # lobes on top, the tip below
    assert mass_below_centre(one(shape=HEART, orientation=20)) > 0.55


@pytest.mark.parametrize("shape", [SQUARE, ELLIPSE, HEART])
def test_largest_sprites_stay_inside_the_frame(shape):
    corners = [(0, 0), (31, 0), (0, 31), (31, 31)]  # (pos_x, pos_y)
    rows = [[shape, LARGEST, k, x, y] for k in range(40) for x, y in [*corners, (MIDDLE, MIDDLE)]]
    images = shapes.render(np.array(rows)).reshape(40, 5, 64, 64) > 0
    border = images.copy()
    border[..., 1:-1, 1:-1] = False
    assert not border.any()  # nothing touches the edge ...
    # ... and nothing is cut: the extreme centres lie a whole number of pixels apart, so the
    # four corner sprites are exact copies of each other, shifted; a cut would break that.
    span = 64 - 2 * shapes.MARGIN
    assert span == int(span)
    s = int(span)
    first = images[:, 0]
    assert np.array_equal(images[:, 1], np.roll(first, s, axis=2))
    assert np.array_equal(images[:, 2], np.roll(first, s, axis=1))
    assert np.array_equal(images[:, 3], np.roll(first, (s, s), axis=(1, 2)))
    counts = images.sum(axis=(2, 3))  # (orientation, position)
    centre = counts[:, -1:]  # differs only by where the outline falls between pixel centres
    assert np.all(np.abs(counts - centre) <= 0.1 * centre)
    # The extreme positions do use the frame: a corner sprite comes close to the edge.
    assert np.nonzero(first[5])[1].min() <= 3


def build_small(*overrides):
    return data.build(config("data.subset=2000", *overrides), progress=False)


def test_build_subset_sizes_and_factors_match_the_pixels():
    splits = build_small("data.val_fraction=0.25")
    assert (len(splits.train), len(splits.val)) == (1500, 500)
    assert splits.test is None
    assert splits.train.images is splits.val.images  # two views of one array
    assert splits.train.shape == (1, 64, 64)
    assert splits.train.factor_names == shapes.FACTOR_NAMES
    assert splits.val.factor_sizes == shapes.FACTOR_SIZES
    factors = np.concatenate([splits.train.factors, splits.val.factors])
    assert factors.dtype == np.int64
    assert len(np.unique(factors, axis=0)) == 2000  # distinct combinations, no overlap
    for part in (splits.train, splits.val):
        pixels = part.uint8(np.arange(len(part)))
        assert np.array_equal(pixels[..., 0], shapes.render(part.factors))
    x = splits.train.batch(slice(0, 8))
    assert x.shape == (8, 1, 64, 64) and set(x.unique().tolist()) == {0.0, 1.0}


def test_build_is_seeded():
    a, b = build_small(), build_small()
    c = build_small("data.seed=1")
    for part in ("train", "val"):
        assert np.array_equal(getattr(a, part).factors, getattr(b, part).factors)
        pixels = [getattr(x, part).uint8(slice(None)) for x in (a, b)]
        assert np.array_equal(*pixels)
    assert not np.array_equal(a.train.factors, c.train.factors)
    chosen = [
        set(
            np.ravel_multi_index(
                np.concatenate([x.train.factors, x.val.factors]).T, (3, 6, 40, 32, 32)
            )
        )
        for x in (a, c)
    ]
    assert chosen[0] != chosen[1]  # another subset, not just another split


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.size=32", r"^data\.size=32: shapes are 64x64; use 0 or 64$"),
        ("data.channels=3", r"^data\.channels=3: .*use 0 or 1$"),
        ("data.subset=737281", r"^data\.subset=737281: shapes has 737280 images"),
        ("data.subset=1", r"^data\.subset=1: .*use 0 \(all\) or 2"),
    ],
)
def test_build_rejects_what_shapes_cannot_be(override, message):
    with pytest.raises(DataError, match=message):
        data.build(config(override), progress=False)


def test_size_and_channels_that_match_are_accepted():
    splits = build_small("data.size=64", "data.channels=1", "data.root=/nonexistent")
    assert splits.train.shape == (1, 64, 64)
