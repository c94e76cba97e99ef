"""The shapes world: 32x32 RGB images of one shape on a grey background, their prompts, and the
hidden human taste that raters feel. Implemented exactly as specified; evaluation relies on it.

- background: grey level U[170, 235] plus per-pixel Gaussian noise of std U[0, 20] ("clutter"),
  the same noise value on all three channels so the background stays grey;
- shape: circle, square (axis-aligned) or triangle (equilateral, apex up), coloured by an HSV
  hue centre (red 0, yellow 60, green 120, cyan 180, blue 240, magenta 300) jittered by up to
  10 degrees, saturation U[0.35, 1], value U[0.55, 1];
- size: small circumradius U[3, 5] px, large U[7, 9] (circle: radius; square: half-diagonal);
- position of the centroid (x right, y down, pixel centres 0..31): left x <= 11, 12 <= y <= 20;
  right x >= 20, 12 <= y <= 20; top y <= 11, 12 <= x <= 20; bottom y >= 20, 12 <= x <= 20;
  center 14 <= x, y <= 18; the shape stays inside the canvas;
- Gaussian blur of sigma U[0, 1.2] px after drawing the shape, before the noise;
- prompt "a {size} {color} {shape} on the {position}" ("in the center"); "" is unconditional;
- pref = (saturation - 0.35)/0.65 + (1 - blur/1.2) + (1 - clutter/20) in [0, 3]; a rater shown
  two images of one prompt prefers A with probability sigmoid((pref_A - pref_B) / 0.1).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass

import numpy as np

SIZE = 32
COLORS = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (3.0, 5.0), "large": (7.0, 9.0)}
POSITIONS = ("left", "right", "top", "bottom", "center")
# (x_lo, x_hi, y_lo, y_hi) of the centroid per position, before the inside-the-canvas limits.
REGIONS = {
    "left": (0.0, 11.0, 12.0, 20.0),
    "right": (20.0, 31.0, 12.0, 20.0),
    "top": (12.0, 20.0, 0.0, 11.0),
    "bottom": (12.0, 20.0, 20.0, 31.0),
    "center": (14.0, 18.0, 14.0, 18.0),
}
HUE_JITTER, SATURATION, VALUE = 10.0, (0.35, 1.0), (0.55, 1.0)
GREY, CLUTTER, BLUR = (170.0, 235.0), (0.0, 20.0), (0.0, 1.2)
RATER_TEMPERATURE = 0.1
SUPERSAMPLE = 4  # sub-pixel samples per axis for anti-aliased edges


@dataclass(frozen=True)
class Attributes:
    color: str
    shape: str
    size: str
    position: str
    hue: float  # degrees
    saturation: float
    value: float
    radius: float  # circumradius, px
    cx: float
    cy: float
    blur: float  # Gaussian sigma, px
    grey: float
    clutter: float  # background noise std

    @property
    def prompt(self) -> str:
        return prompt_of(self.size, self.color, self.shape, self.position)

    @property
    def pref(self) -> float:
        return pref_of(self.saturation, self.blur, self.clutter)

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_of(size: str, color: str, shape: str, position: str) -> str:
    where = "in the center" if position == "center" else f"on the {position}"
    return f"a {size} {color} {shape} {where}"


def parse_prompt(prompt: str) -> tuple[str, str, str, str]:
    """(size, color, shape, position) of a world prompt; ValueError for anything else."""
    words = prompt.split()
    if len(words) != 7 or words[6] not in POSITIONS:
        raise ValueError(f"not a shapes-world prompt: {prompt!r}")
    size, color, shape, position = words[1], words[2], words[3], words[6]
    if size not in SIZES or color not in COLORS or shape not in SHAPES or prompt != prompt_of(size, color, shape, position):
        raise ValueError(f"not a shapes-world prompt: {prompt!r}")
    return size, color, shape, position


def is_world_prompt(prompt: str) -> bool:
    """A caption of this world: the reader can judge an image of it."""
    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def all_prompts() -> list[str]:
    """Every prompt of the world (2 sizes x 6 colours x 3 shapes x 5 positions = 180)."""
    return [prompt_of(s, c, sh, p) for s in SIZES for c in COLORS for sh in SHAPES for p in POSITIONS]


def held_out_prompts(n: int, seed: int) -> list[str]:
    """`n` prompts drawn with replacement, by a seed of their own (judging the world's models)."""
    rng = np.random.default_rng(seed)
    return [all_prompts()[i] for i in rng.integers(0, len(all_prompts()), n)]


def pref_of(saturation: float, blur: float, clutter: float) -> float:
    return (saturation - 0.35) / 0.65 + (1 - blur / 1.2) + (1 - clutter / 20)


def rater_prefers_first(pref_a: np.ndarray, pref_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-(np.asarray(pref_a) - np.asarray(pref_b)) / RATER_TEMPERATURE))
    return rng.random(p.shape) < p


def extent(shape: str, r):
    """How far the shape reaches from its centroid: (left, right, up, down) in px (r a float, or a
    tensor of radii)."""
    if shape == "circle":
        return r, r, r, r
    if shape == "square":
        h = r / math.sqrt(2)
        return h, h, h, h
    w = r * math.sqrt(3) / 2  # equilateral, apex up: apex r above the centroid, base r/2 below
    return w, w, r, r / 2


def sample_attributes(rng: np.random.Generator, prompt: str | None = None) -> Attributes:
    """One draw of every latent attribute; the prompt's categories if given."""
    if prompt is None:
        size = rng.choice(list(SIZES))
        color, shape, position = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(POSITIONS)
    else:
        size, color, shape, position = parse_prompt(prompt)
    r = rng.uniform(*SIZES[size])
    left, right, up, down = extent(shape, r)
    x_lo, x_hi, y_lo, y_hi = REGIONS[position]
    cx = rng.uniform(max(x_lo, left), min(x_hi, SIZE - 1 - right))
    cy = rng.uniform(max(y_lo, up), min(y_hi, SIZE - 1 - down))
    return Attributes(
        color=str(color), shape=str(shape), size=str(size), position=str(position),
        hue=(COLORS[color] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0,
        saturation=rng.uniform(*SATURATION), value=rng.uniform(*VALUE), radius=r, cx=cx, cy=cy,
        blur=rng.uniform(*BLUR), grey=rng.uniform(*GREY), clutter=rng.uniform(*CLUTTER),
    )


def subpixels() -> tuple[np.ndarray, np.ndarray]:
    """x and y of every sub-pixel sample [32 * SUPERSAMPLE, 32 * SUPERSAMPLE] (pixel centres 0..31)."""
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    axis = (np.arange(SIZE)[:, None] + offsets[None, :]).reshape(-1)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return x, y


def coverage_of(inside: np.ndarray) -> np.ndarray:
    """Fraction of each pixel [32, 32] inside, from a sub-pixel test laid out as `subpixels`."""
    return inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def coverage(a: Attributes) -> np.ndarray:
    """Fraction of each pixel inside the shape, from SUPERSAMPLE^2 sub-pixel tests."""
    x, y = subpixels()
    dx, dy = x - a.cx, y - a.cy
    if a.shape == "circle":
        inside = dx**2 + dy**2 <= a.radius**2
    elif a.shape == "square":
        h = a.radius / math.sqrt(2)
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    else:
        # below the two upper edges (slope sqrt(3) from the apex) and above the base
        apex = -a.radius
        inside = (dy <= a.radius / 2) & (dy - apex >= math.sqrt(3) * np.abs(dx))
    return coverage_of(inside)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge replication; sigma 0 leaves the image as is."""
    if sigma < 1e-3:
        return img
    radius = int(math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        padded = np.pad(img, [(radius, radius) if i == axis else (0, 0) for i in range(3)], mode="edge")
        img = sum(w * np.take(padded, range(i, i + SIZE), axis=axis) for i, w in enumerate(k))
    return img


def footprint(a: Attributes) -> np.ndarray:
    """The shape's share of each pixel [32, 32] after the blur: 1 on the shape, 0 on the background."""
    return _gaussian_blur(coverage(a)[..., None], a.blur)[..., 0]


def render(a: Attributes, rng: np.random.Generator) -> np.ndarray:
    """The uint8 [32, 32, 3] image of one set of attributes (rng draws the clutter noise)."""
    return paint(a, coverage(a), a.blur, rng)


def paint(a: Attributes, cov: np.ndarray, blur: float, rng: np.random.Generator) -> np.ndarray:
    """A coverage `cov` [32, 32] in a's colour on a's grey, blurred by `blur`, with a's clutter noise:
    the world's drawing of any outline (`render` passes the world's own)."""
    rgb = np.array(colorsys.hsv_to_rgb(a.hue / 360.0, a.saturation, a.value)) * 255.0
    cov = cov[..., None]
    img = a.grey * (1 - cov) + rgb[None, None, :] * cov
    img = _gaussian_blur(img, blur)
    img = img + rng.normal(0.0, a.clutter, size=(SIZE, SIZE, 1)) if a.clutter > 0 else img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample(n: int, seed: int, prompts: list[str] | None = None) -> tuple[np.ndarray, list[Attributes]]:
    """n images [n, 32, 32, 3] uint8 with their attributes; prompts fix the categories if given."""
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng, prompts[i] if prompts else None) for i in range(n)]
    return np.stack([render(a, rng) for a in attrs]), attrs
