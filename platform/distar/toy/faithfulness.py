"""How far an image is from every image the shapes world can render: the world-faithfulness check.

The attribute reader names the nearest class, so a square with pinched sides still reads as a
square. This check does not classify: it finds the outline the world would draw that explains the
image best, and reports how much of the shape's area that best outline leaves misplaced.

The world draws one flat-coloured shape on grey, blurs, then adds clutter noise that is the same on
all three channels (distar.toy.world). The channel differences R-G and G-B cancel the grey and the
noise: what is left is the shape's blurred footprint times one colour difference. So the check fits
footprints the world can draw (each shape, each size range, centroids in the two position regions
nearest the image's colour, blur within the world's range) to the two difference channels, each
with its best colour and a uniform background cast in closed form, keeps the best, and reports

    misplaced = area between the footprint seen and the best world footprint, within 4 px of it
                (both blurred by 1 px, so per-pixel noise averages out and outlines do not)
                / the best footprint's area                      (0 = an outline the world draws)

A pinched square, a lumpy circle, a blur beyond the world's range all misplace area no world
outline can take back. A faint colour cast or coloured clutter far from the shape is background,
not outline: the distribution metrics judge that. An image with no colour at all is nothing the
world draws: misplaced 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distar.toy import world

# Above this share an image counts as off-world: world renders stay under it (their only residual
# is uint8 rounding and bright shapes' clipping); bench/faithfulness.py measures it and what it flags.
TOLERANCE = 0.04
OUTLINE_REACH = 4  # px around the fitted shape where outlines are judged; farther off is background
CANDIDATE_POSITIONS = 2  # the position regions nearest the image's colour centroid that are tried
STEPS, LR = 60, 0.2
SEARCH_SUPERSAMPLE = 2  # sub-pixels per axis while searching (the world draws with 4)
_TAPS = torch.arange(-4, 5, dtype=torch.float32)  # blur kernel support: 3 sigma of the world's largest blur, rounded up


@dataclass
class Fit:
    """Per image: the share of its shape's area misplaced, and the best world outline's classes."""

    misplaced: Tensor  # [N]
    shape: list[str]
    size: list[str]
    position: list[str]

    @property
    def off_world(self) -> Tensor:
        return self.misplaced > TOLERANCE


def colour_differences(images: Tensor) -> Tensor:
    """images float [N, 3, 32, 32] in [0, 1] -> [N, 2, 32, 32]: R-G and G-B in grey levels."""
    x = images.float() * 255.0
    return torch.stack([x[:, 0] - x[:, 1], x[:, 1] - x[:, 2]], dim=1)


def _inside_distance(shape: str, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """Signed distance (px, negative inside) to the shape's edge, as world.coverage draws it."""
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2 + 1e-12) - r
    if shape == "square":
        h = r / math.sqrt(2)
        return torch.maximum(dx.abs() - h, dy.abs() - h)
    return torch.maximum(dy - r / 2, (math.sqrt(3) * dx.abs() - dy - r) / 2)  # base, and the two edges from the apex


def footprint(shape: str, cx: Tensor, cy: Tensor, r: Tensor, blur: Tensor, search: bool = False) -> Tensor:
    """[M] parameters -> [M, 32, 32]: world.footprint in torch, the same sub-pixel tests and blur
    (edges replicated). `search`: differentiable instead, one inside ramp a pixel wide per pixel
    (16 times cheaper than the sub-pixels), to find the parameters by gradient."""
    s = SEARCH_SUPERSAMPLE if search else world.SUPERSAMPLE
    sub = (torch.arange(s, dtype=torch.float32) + 0.5) / s - 0.5
    axis = (torch.arange(world.SIZE, dtype=torch.float32)[:, None] + sub[None, :]).reshape(-1)
    dx = axis[None, None, :] - cx[:, None, None]
    dy = axis[None, :, None] - cy[:, None, None]
    distance = _inside_distance(shape, dx, dy, r[:, None, None])
    inside = (0.5 - s * distance).clamp(0, 1) if search else (distance <= 0).float()
    cov = inside.reshape(len(cx), world.SIZE, s, world.SIZE, s).mean(dim=(2, 4))
    return _blurred(cov, blur)


def _colour_fit(d: Tensor, f: Tensor) -> Tensor:
    """Least squares of d [M, 2, H, W] on footprint f [M, H, W] and a uniform background cast:
    [M, 2 channels, (colour, cast)]."""
    basis = torch.stack([f, torch.ones_like(f)], dim=1).flatten(2)  # [M, 2, HW]
    gram = basis @ basis.transpose(1, 2) + 1e-6 * torch.eye(2)
    return d.flatten(2) @ basis.transpose(1, 2) @ torch.linalg.inv(gram)


def _unexplained(d: Tensor, f: Tensor) -> Tensor:
    """[M]: share of d's energy that footprint f, in its best colour over its best cast, leaves."""
    coef = _colour_fit(d, f)
    fitted = coef[..., 0, None, None] * f[:, None] + coef[..., 1, None, None]
    return (d - fitted).pow(2).sum(dim=(1, 2, 3)) / d.pow(2).sum(dim=(1, 2, 3)).clamp_min(1e-9)


def colour_centroids(d: Tensor) -> Tensor:
    """[N, 2]: x and y of each image's colour (where the world's shape is, for every shape)."""
    w = d.pow(2).sum(dim=1)
    w = w / w.sum(dim=(1, 2), keepdim=True).clamp_min(1e-9)
    grid = torch.arange(world.SIZE, dtype=torch.float32)
    return torch.stack([(w.sum(dim=1) * grid).sum(dim=1), (w.sum(dim=2) * grid).sum(dim=1)], dim=1)


def _blurred(x: Tensor, sigma: Tensor | float) -> Tensor:
    """x [N, H, W] blurred by a Gaussian of `sigma` px (one per image, or one for all), edges
    replicated as world's blur does."""
    n, pad = len(x), len(_TAPS) // 2
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(n)
    k = torch.exp(-0.5 * (_TAPS[None, :] / sigma[:, None].clamp_min(0.02)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True))[:, None, None, :]  # [N, 1, 1, taps]
    x = F.conv2d(F.pad(x[None], (pad, pad, 0, 0), mode="replicate"), k, groups=n)  # along x
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), k.transpose(2, 3), groups=n)[0]  # along y


def misplaced(d: Tensor, f: Tensor) -> Tensor:
    """[N]: the share of footprint f's area [N, H, W] that d misplaces (the module's text)."""
    coef = _colour_fit(d, f)
    colour, cast = coef[..., 0], coef[..., 1]
    seen = torch.einsum("nchw,nc->nhw", d - cast[..., None, None], colour) / colour.pow(2).sum(1).clamp_min(1e-9)[:, None, None]
    near = _blurred(f, OUTLINE_REACH / 2) > 0.02
    return (_blurred(seen - f, 1.0).abs() * near).sum(dim=(1, 2)) / f.sum(dim=(1, 2)).clamp_min(1e-9)


def _nearest_positions(centroids: Tensor) -> list[list[str]]:
    """Per image, the CANDIDATE_POSITIONS regions closest to its colour's centroid."""
    out = []
    for x, y in centroids.tolist():
        gap = {p: math.hypot(max(lo - x, 0, x - hi), max(top - y, 0, y - bottom)) for p, (lo, hi, top, bottom) in world.REGIONS.items()}
        out.append(sorted(gap, key=gap.get)[:CANDIDATE_POSITIONS])
    return out


def _fit_shape(shape: str, d: Tensor, start: Tensor, sizes: list[str], positions: list[str], steps: int) -> tuple[Tensor, Tensor]:
    """Per row of d, the least unexplained energy and its footprint over the world's `shape`s of that row's size, centred in that
    row's position region: the centroid (from `start` [M, 2], moved into the region), radius and
    blur found by Adam within the world's limits."""
    r_lo, r_hi = torch.tensor([world.SIZES[s] for s in sizes]).T
    box = torch.tensor([world.REGIONS[p] for p in positions])  # [M, 4]: x_lo, x_hi, y_lo, y_hi

    def limits(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The radius, and where the centroid may be at that radius: lowest x and y, and how far beyond."""
        r = r_lo + torch.sigmoid(u[:, 2]) * (r_hi - r_lo)
        left, right, up, down = world.extent(shape, r)
        lo = torch.stack([torch.maximum(box[:, 0], left), torch.maximum(box[:, 2], up)], dim=1)
        hi = torch.stack([torch.minimum(box[:, 1], world.SIZE - 1 - right), torch.minimum(box[:, 3], world.SIZE - 1 - down)], dim=1)
        return r, lo, (hi - lo).clamp_min(0)

    def params(u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r, lo, span = limits(u)
        c = lo + torch.sigmoid(u[:, :2]) * span
        return c[:, 0], c[:, 1], r, world.BLUR[1] * torch.sigmoid(u[:, 3])

    u = torch.zeros(len(d), 4)  # unconstrained centroid x, y, radius, blur: mid radius and blur to start
    _, lo, span = limits(u)
    u[:, :2] = torch.logit(((start - lo) / span.clamp_min(1e-6)).clamp(0.05, 0.95))  # the image's centroid, within the region
    u.requires_grad_(True)
    opt = torch.optim.Adam([u], lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        _unexplained(d, footprint(shape, *params(u), search=True)).sum().backward()
        opt.step()
    with torch.no_grad():
        f = footprint(shape, *params(u))  # judged as the world draws
        return _unexplained(d, f), f


def check(images: Tensor, steps: int = STEPS) -> Fit:
    """The world-faithfulness of images float [N, 3, 32, 32] in [0, 1] (see the module's text).
    Fits by gradient, so it takes gradients even where its caller turned them off."""
    with torch.inference_mode(False), torch.enable_grad():
        return _check(colour_differences(images.detach().clone()), steps)


def _check(d: Tensor, steps: int) -> Fit:
    centroids = colour_centroids(d)
    near = _nearest_positions(centroids)
    n, per_shape = len(d), [(size, i) for size in world.SIZES for i in range(CANDIDATE_POSITIONS)]
    rows = [(k, size, i) for k in range(n) for size, i in per_shape]  # every image against every size and near position
    image, sizes, positions = [k for k, _, _ in rows], [size for _, size, _ in rows], [near[k][i] for k, _, i in rows]
    fits = [_fit_shape(shape, d[image], centroids[image], sizes, positions, steps) for shape in world.SHAPES]
    unexplained = torch.stack([u.reshape(n, len(per_shape)) for u, _ in fits], dim=1).flatten(1)  # [N, shapes x sizes x positions]
    footprints = torch.stack([f.reshape(n, len(per_shape), world.SIZE, world.SIZE) for _, f in fits], dim=1).flatten(1, 2)
    which = unexplained.argmin(dim=1)
    share = misplaced(d, footprints[torch.arange(n), which])
    colourless = d.abs().amax(dim=(1, 2, 3)) < 1.0  # under one grey level anywhere: no shape the world could draw
    share = torch.where(colourless, torch.ones_like(share), share)
    named = [(world.SHAPES[j // len(per_shape)], *per_shape[j % len(per_shape)]) for j in which.tolist()]
    return Fit(misplaced=share, shape=[t[0] for t in named], size=[t[1] for t in named],
               position=[near[k][t[2]] for k, t in enumerate(named)])
