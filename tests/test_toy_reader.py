"""The reader's training augmentation: off-world backgrounds change the background, never the shape."""

import numpy as np
import pytest
import torch

from distar.toy import world
from distar.toy.reader import footprints, off_world_background, to_tensor


def test_footprint_is_the_blurred_shape():
    images, attrs = world.sample(8, seed=3, prompts=["a large red square in the center"] * 8)
    for image, a in zip(images, attrs):
        f = world.footprint(a)
        assert f.shape == (world.SIZE, world.SIZE) and f.min() >= 0 and f.max() <= 1 + 1e-9
        assert f.sum() == pytest.approx(world.coverage(a).sum(), rel=1e-6)  # blur moves mass, keeps it
        shape_rgb = image[f > 0.95].astype(float).mean(0)
        background = image[f < 1e-3].astype(float).mean(0)
        assert shape_rgb[0] - shape_rgb[1:].max() > 30 and np.ptp(background) < 3  # red on grey


def test_off_world_background_leaves_the_shape_alone():
    images, attrs = world.sample(16, seed=4)
    x = to_tensor(images)
    shape = footprints(attrs)
    out = off_world_background(x, shape, torch.Generator().manual_seed(0))
    whole = (shape == 1).expand_as(x)
    assert whole.any()
    background = (shape < 1e-3).expand_as(x)
    assert torch.equal(out[whole], x[whole])
    changed = (out - x).abs()[background]
    assert changed.mean() > 2 / 255  # tinted and cluttered...
    channel_spread = (out - x)[:, :, 0, 0].std(dim=1)
    assert (channel_spread > 1 / 255).float().mean() > 0.8  # ...differently per channel: no longer grey
    again = off_world_background(x, shape, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
