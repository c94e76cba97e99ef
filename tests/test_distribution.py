"""Distribution metrics (distar.evaluation.distribution) on point sets whose answers are known."""

import math

import pytest
import torch

from distar.evaluation import distribution


def gaussian(n: int, mean: float, std: float, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return mean + std * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_frechet_distance_of_gaussians_is_their_closed_form():
    # N(0, I) against N(m, s^2 I) in D dimensions: D m^2 + D (1 - s)^2.
    real, fake = gaussian(20000, 0.0, 1.0, seed=1), gaussian(20000, 0.5, 2.0, seed=2)
    assert distribution.frechet(real, fake) == pytest.approx(4 * 0.25 + 4 * 1.0, rel=0.03)
    assert distribution.frechet(real, real) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_survives_fewer_samples_than_dimensions():
    value = distribution.frechet(gaussian(10, 0.0, 1.0, dim=32, seed=3), gaussian(10, 0.0, 1.0, dim=32, seed=4))
    assert math.isfinite(value) and value > 0


def test_a_generator_off_the_data_loses_precision_and_density():
    real = gaussian(500, 0.0, 1.0, seed=5)
    same = distribution.manifold(real, gaussian(500, 0.0, 1.0, seed=6))
    off = distribution.manifold(real, gaussian(500, 4.0, 1.0, seed=7))
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and 0.7 < same["density"] < 1.3 and same["coverage"] > 0.8
    assert off["precision"] < 0.05 and off["density"] < 0.05 and off["coverage"] < 0.05


def test_a_collapsed_generator_keeps_precision_and_loses_recall_and_coverage():
    real = gaussian(500, 0.0, 1.0, seed=8)
    collapsed = distribution.manifold(real, gaussian(500, 0.0, 0.05, seed=9))  # every sample near the mode
    assert collapsed["precision"] > 0.95
    assert collapsed["recall"] < 0.1 and collapsed["coverage"] < 0.2


def test_in_the_shapes_world_renders_match_the_world_and_blurred_or_repeated_ones_do_not():
    """On the reader's features against world renders of the same prompts: another draw of the
    world, the same attributes blurred to 2.4 px (twice the world's most), one image repeated."""
    import numpy as np

    from distar.evaluation.judges import load_reader, world_distribution
    from distar.toy import world
    from distar.toy.reader import to_tensor

    prompts = world.held_out_prompts(distribution.FID_MIN, 1)
    reader = load_reader(prompts)
    drawn, _ = world.sample(len(prompts), seed=123, prompts=prompts)
    rng = np.random.default_rng(0)
    blurred = np.stack([world.paint(a, world.coverage(a), 2.4, rng) for a in (world.sample_attributes(rng, p) for p in prompts)])
    same, off, one = (world_distribution(reader, to_tensor(x), prompts) for x in (drawn, blurred, np.repeat(drawn[:1], len(prompts), 0)))
    assert same["world/precision"] > 0.9 and same["world/recall"] > 0.9
    assert off["world/precision"] < same["world/precision"] - 0.1 and off["world/fid"] > 2 * same["world/fid"]
    assert one["world/recall"] < 0.05 and one["world/coverage"] < 0.05 and one["world/fid"] > 5 * same["world/fid"]
