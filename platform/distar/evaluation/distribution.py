"""Distribution metrics: how a set of generated images sits against a set of real ones, on the
features of a network the run does not optimise. Pure math on feature matrices [N, D].

- `frechet`: the Frechet distance between Gaussians fitted to the two sets (FID when the features
  are Inception's). Biased upwards at small N; compare models only at the same N, and never below
  FID_MIN images a set.
- `manifold`: precision and recall (Kynkaenniemi et al. 2019: the share of generated samples
  inside the real samples' k-NN balls, and of real samples inside the generated ones') and
  density and coverage (Naeem et al. 2020: how many real balls hold each generated sample, over
  k; the share of real balls holding any). Precision and density fall when a generator leaves
  the data; recall and coverage fall when it collapses onto part of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

FID_MIN = 64  # images a set needs for a Frechet distance worth reporting
NEAREST = 3  # k of the k-NN balls (the papers' default is 3 to 5)


def frechet(real: Tensor, fake: Tensor) -> float:
    """||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r^1/2 S_f S_r^1/2)^1/2), in float64."""
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r, s_f = torch.cov(real.T), torch.cov(fake.T)
    root_r = _psd_sqrt(s_r)
    cross = _psd_sqrt(root_r @ s_f @ root_r)  # symmetric PSD, so its trace is that of (S_r S_f)^1/2
    return float((mu_r - mu_f).pow(2).sum() + s_r.trace() + s_f.trace() - 2 * cross.trace())


def _psd_sqrt(m: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def manifold(real: Tensor, fake: Tensor, k: int = NEAREST) -> dict[str, float]:
    """precision, recall, density and coverage of `fake` against `real` (see the module's text)."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_neighbour(real, k), _kth_neighbour(fake, k)
    between = torch.cdist(fake, real)  # [fake, real]
    inside_real = between <= r_real[None, :]  # fake j inside real i's ball
    inside_fake = between.T <= r_fake[None, :]  # real i inside fake j's ball
    return {"precision": float(inside_real.any(1).double().mean()), "recall": float(inside_fake.any(1).double().mean()),
            "density": float(inside_real.double().sum(1).mean() / k), "coverage": float((between.min(0).values <= r_real).double().mean())}


def _kth_neighbour(x: Tensor, k: int) -> Tensor:
    """Each sample's distance to its k-th nearest other sample."""
    d = torch.cdist(x, x)
    return d.topk(k + 1, dim=1, largest=False).values[:, k]  # column 0 is the sample itself


def compare(real: Tensor, fake: Tensor) -> dict[str, float]:
    """`manifold`'s four values, and `fid` (the Frechet distance) when both sets hold FID_MIN images."""
    out = manifold(real, fake)
    if min(len(real), len(fake)) >= FID_MIN:
        out["fid"] = frechet(real, fake)
    return out
