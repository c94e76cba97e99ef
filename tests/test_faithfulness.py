"""The world-faithfulness check (distar.toy.faithfulness): the world's own renders pass and their
classes come back; the outlines the world never draws (distar.toy.distortions) do not."""

import numpy as np
import torch

from distar.toy import distortions, faithfulness, world
from distar.toy.reader import to_tensor


def test_world_renders_are_in_world_and_their_best_outline_is_their_own():
    images, attrs = world.sample(18, seed=4)
    fit = faithfulness.check(to_tensor(images))
    assert (fit.misplaced < faithfulness.TOLERANCE).all(), fit.misplaced
    assert fit.shape == [a.shape for a in attrs] and fit.size == [a.size for a in attrs] and fit.position == [a.position for a in attrs]


def test_the_torch_footprint_is_the_worlds():
    _, attrs = world.sample(12, seed=5)
    for a in attrs:
        t = lambda v: torch.tensor([float(v)])  # noqa: E731
        f = faithfulness.footprint(a.shape, t(a.cx), t(a.cy), t(a.radius), t(a.blur))[0].numpy()
        assert np.abs(f - world.footprint(a)).max() < 1e-3, a


def test_distortions_at_strength_zero_are_the_worlds_outlines():
    _, attrs = world.sample(30, seed=6)
    square = next(a for a in attrs if a.shape == "square")
    circle = next(a for a in attrs if a.shape == "circle")
    assert np.array_equal(distortions.pinched_square(square, 0.0), world.coverage(square))
    assert np.array_equal(distortions.wobbly_circle(circle, 0.0), world.coverage(circle))


def test_what_the_world_never_draws_misplaces_area_and_more_the_stronger_it_is():
    """Pinched squares, lumpy circles and blur beyond the world's range, each from the same world
    attributes and noise at two strengths: the stronger misplaces more, and strong ones are off-world."""
    for kind, weak, strong in (("pinched", 0.1, 0.35), ("wobbly", 0.05, 0.2), ("blurred", 0.25, 1.0)):
        images = {s: np.stack([distortions.distorted(kind, s, np.random.default_rng(i))[0] for i in range(8)]) for s in (weak, strong)}
        share = {s: faithfulness.check(to_tensor(x)).misplaced for s, x in images.items()}
        assert share[strong].median() > share[weak].median(), (kind, share)
        assert (share[strong] > faithfulness.TOLERANCE).float().mean() >= 0.75, (kind, share[strong])


def test_an_image_without_colour_is_nothing_the_world_draws():
    grey = torch.full((2, 3, world.SIZE, world.SIZE), 0.8)
    assert faithfulness.check(grey).misplaced.tolist() == [1.0, 1.0]


def test_it_fits_where_its_caller_turned_gradients_off():
    images, _ = world.sample(2, seed=8)
    with torch.inference_mode():
        x = to_tensor(images)
        assert (faithfulness.check(x).misplaced < faithfulness.TOLERANCE).all()
