"""The shapes world against its specification: attribute ranges, geometry, colours, prompts, taste."""

import colorsys
import math

import numpy as np
import pytest

from distar.toy import world


@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(0)
    return [world.sample_attributes(rng) for _ in range(3000)]


def test_prompts_form_a_closed_grammar():
    prompts = world.all_prompts()
    assert len(prompts) == len(set(prompts)) == 180
    assert "a small red circle on the left" in prompts and "a large blue triangle in the center" in prompts
    for p in prompts:
        assert world.prompt_of(*world.parse_prompt(p)) == p
    for bad in ("", "a red circle", "a small red circle on the center", "a huge red circle on the left", "a small red circle in the left"):
        with pytest.raises(ValueError, match="not a shapes-world prompt"):
            world.parse_prompt(bad)


def test_attribute_ranges(draws):
    for a in draws:
        offset = (a.hue - world.COLORS[a.color] + 180) % 360 - 180
        assert abs(offset) <= world.HUE_JITTER
        assert 0.35 <= a.saturation <= 1.0 and 0.55 <= a.value <= 1.0
        assert world.SIZES[a.size][0] <= a.radius <= world.SIZES[a.size][1]
        assert 0 <= a.blur <= 1.2 and 170 <= a.grey <= 235 and 0 <= a.clutter <= 20
    for key, values in (("color", world.COLORS), ("shape", world.SHAPES), ("size", world.SIZES), ("position", world.POSITIONS)):
        assert {getattr(a, key) for a in draws} == set(values)


def test_centroid_regions_and_canvas(draws):
    for a in draws:
        x, y = a.cx, a.cy
        inside = {
            "left": x <= 11 and 12 <= y <= 20,
            "right": x >= 20 and 12 <= y <= 20,
            "top": y <= 11 and 12 <= x <= 20,
            "bottom": y >= 20 and 12 <= x <= 20,
            "center": 14 <= x <= 18 and 14 <= y <= 18,
        }
        assert inside[a.position], a
        left, right, up, down = world.extent(a.shape, a.radius)
        assert x - left >= 0 and x + right <= 31 and y - up >= 0 and y + down <= 31, a


def plain(shape, **kw):
    """Attributes with no blur and no clutter, so pixels can be checked exactly."""
    base = dict(color="red", shape=shape, size="large", position="center", hue=0.0, saturation=1.0, value=1.0,
                radius=8.0, cx=16.0, cy=16.0, blur=0.0, grey=200.0, clutter=0.0)
    return world.Attributes(**{**base, **kw})


@pytest.mark.parametrize("shape", world.SHAPES)
def test_rendered_geometry(shape):
    a = plain(shape, cx=15.3, cy=16.6)
    cov = world.coverage(a)
    ys, xs = np.mgrid[0:32, 0:32]
    # The centroid of the drawn area is the shape's centroid (for the triangle: its circumcentre).
    assert abs((cov * xs).sum() / cov.sum() - a.cx) < 0.1 and abs((cov * ys).sum() / cov.sum() - a.cy) < 0.1
    area = {"circle": math.pi * a.radius**2, "square": 2 * a.radius**2, "triangle": 3 * math.sqrt(3) / 4 * a.radius**2}[shape]
    assert abs(cov.sum() - area) / area < 0.02
    if shape == "triangle":  # apex up: rows widen downward, the apex is r above the centroid
        widths = cov.sum(1)
        rows = np.nonzero(widths > 0.05)[0]
        assert widths[rows[0]] < widths[rows[-1]] and abs(rows[0] - (a.cy - a.radius)) <= 1


def test_colour_background_and_noise():
    rng = np.random.default_rng(1)
    a = plain("square", hue=240.0, saturation=0.6, value=0.8)
    img = world.render(a, rng).astype(float)
    expected = np.array(colorsys.hsv_to_rgb(240 / 360, 0.6, 0.8)) * 255
    assert np.abs(img[16, 16] - expected).max() <= 0.5
    assert np.all(img[0, 0] == 200)
    noisy = world.render(plain("square", clutter=15.0), rng).astype(float)
    corner = noisy[:6, :6]
    assert np.all(corner[..., 0] == corner[..., 1]) and np.all(corner[..., 1] == corner[..., 2])  # stays grey
    assert 10 < corner[..., 0].std() < 20


def test_blur_spreads_edges_and_keeps_mass():
    sharp = world.coverage(plain("square"))[..., None] * 100.0
    blurred = world._gaussian_blur(sharp, 1.2)
    assert abs(blurred.sum() - sharp.sum()) / sharp.sum() < 0.01  # the square sits far from the border
    assert (blurred > 1).sum() > (sharp > 1).sum()
    assert np.array_equal(world._gaussian_blur(sharp, 0.0), sharp)


def test_pref_and_raters():
    assert world.pref_of(1.0, 0.0, 0.0) == pytest.approx(3.0)
    assert world.pref_of(0.35, 1.2, 20.0) == pytest.approx(0.0)
    rng = np.random.default_rng(2)
    n = 40_000
    a, b = np.full(n, 1.6), np.full(n, 1.5)
    rate = world.rater_prefers_first(a, b, rng).mean()
    assert abs(rate - 1 / (1 + math.exp(-1.0))) < 0.01  # sigmoid(0.1 / 0.1)


def test_sampling_is_seeded_and_follows_prompts():
    prompts = ["a small green triangle on the top", "a large cyan circle in the center"]
    x1, attrs = world.sample(2, seed=7, prompts=prompts)
    x2, _ = world.sample(2, seed=7, prompts=prompts)
    assert x1.dtype == np.uint8 and x1.shape == (2, 32, 32, 3) and np.array_equal(x1, x2)
    assert [a.prompt for a in attrs] == prompts
    assert not np.array_equal(x1, world.sample(2, seed=8, prompts=prompts)[0])
