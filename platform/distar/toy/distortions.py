"""Images the shapes world never draws, made on purpose to test the world-faithfulness check: the
failures reward hacking produced here (squares with pinched sides, lumpy circles) and blur beyond
the world's range. Each keeps the world's colours, background, clutter and prompt, so only the
outline (or the blur) is wrong, and takes a strength: 0 is the world's own image.
"""

from __future__ import annotations

import math

import numpy as np

from distar.toy import world

KINDS = ("pinched", "wobbly", "blurred")


def pinched_square(a: world.Attributes, depth: float) -> np.ndarray:
    """Coverage of a square whose four sides bow inwards, by `depth` x half its side at the middle."""
    x, y = world.subpixels()
    dx, dy, h = np.abs(x - a.cx), np.abs(y - a.cy), a.radius / math.sqrt(2)
    inset = lambda t: depth * h * np.clip(1 - (t / h) ** 2, 0, 1)  # noqa: E731 -- a parabola along each side
    return world.coverage_of((dx <= h - inset(dy)) & (dy <= h - inset(dx)))


def wobbly_circle(a: world.Attributes, amplitude: float, lobes: int = 5) -> np.ndarray:
    """Coverage of a circle whose radius swings by `amplitude` x itself, `lobes` times round."""
    x, y = world.subpixels()
    dx, dy = x - a.cx, y - a.cy
    edge = a.radius * (1 + amplitude * np.sin(lobes * np.arctan2(dy, dx)))
    return world.coverage_of(dx**2 + dy**2 <= edge**2)


def distorted(kind: str, strength: float, rng: np.random.Generator) -> tuple[np.ndarray, world.Attributes]:
    """One uint8 [32, 32, 3] image of `kind` at `strength` and the world attributes it started from:
    pinched (a square, strength = depth), wobbly (a circle, strength = amplitude) or blurred (any
    shape, blurred by the world's largest blur x (1 + strength))."""
    if kind not in KINDS:
        raise ValueError(f"unknown distortion {kind!r}; one of {', '.join(KINDS)}")
    shape = {"pinched": "square", "wobbly": "circle"}.get(kind, str(rng.choice(world.SHAPES)))
    prompt = world.prompt_of(str(rng.choice(list(world.SIZES))), str(rng.choice(list(world.COLORS))), shape, str(rng.choice(world.POSITIONS)))
    a = world.sample_attributes(rng, prompt)
    if kind == "pinched":
        return world.paint(a, pinched_square(a, strength), a.blur, rng), a
    if kind == "wobbly":
        return world.paint(a, wobbly_circle(a, strength), a.blur, rng), a
    return world.paint(a, world.coverage(a), world.BLUR[1] * (1 + strength), rng), a
