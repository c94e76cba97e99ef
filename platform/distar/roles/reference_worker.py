"""Reference worker: the frozen reference with CFG; returns D_ref and its share of the divergence gradient.

The reference pool is a set of these, one per replica (distar.cluster.pools.ReferencePool)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distar.models.diffusion import Denoiser, TextConditioner, cat_cond, expand_cond
from distar.objectives import DivergenceSpec, reference_side


@dataclass
class ReferenceRequest:
    x_t: Tensor
    t: Tensor
    prompts: list[str]
    x0: Tensor
    d_fake: Tensor
    spec: DivergenceSpec  # guidance scale and loss constants travel with the request

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def merge(cls, requests: list[ReferenceRequest]) -> ReferenceRequest:
        """One request of the same objective for all of them (their specs must be equal)."""
        (spec,) = {r.spec for r in requests}
        cat = lambda name: torch.cat([getattr(r, name) for r in requests])  # noqa: E731
        return cls(cat("x_t"), cat("t"), [p for r in requests for p in r.prompts], cat("x0"), cat("d_fake"), spec)


@dataclass
class ReferenceResult:
    d_ref: Tensor
    g_ref: Tensor | None  # dL/dx_t through the reference; None when the trainer needs none

    def split(self, sizes: list[int]) -> list[ReferenceResult]:
        g_ref = [None] * len(sizes) if self.g_ref is None else self.g_ref.split(sizes)
        return [ReferenceResult(d, g) for d, g in zip(self.d_ref.split(sizes), g_ref)]


class ReferenceWorker:
    """Holds the reference UNet and text encoder(s); stateless with respect to hyperparameters."""

    def __init__(self, denoiser: Denoiser, conditioner: TextConditioner):
        self.denoiser = denoiser.requires_grad_(False).eval()
        self.conditioner = conditioner
        self._empty = conditioner([""])  # the unconditional embedding, computed once

    def __call__(self, req: ReferenceRequest) -> ReferenceResult:
        n, spec = len(req.prompts), req.spec
        cond = self.conditioner(req.prompts)
        uncond = expand_cond(self._empty, n)

        def denoise(x: Tensor) -> tuple[Tensor, Tensor | None]:
            if not spec.needs_uncond:
                return self.denoiser(x, req.t, cond), None
            both = self.denoiser(torch.cat([x, x]), torch.cat([req.t, req.t]), cat_cond(cond, uncond))
            return both[:n], both[n:]

        a, b = self.denoiser.schedule.ab(req.t, req.x_t)
        d_ref, g_ref = reference_side(denoise, req.x_t, req.x0, req.d_fake, a, b, spec)
        return ReferenceResult(d_ref, g_ref)
