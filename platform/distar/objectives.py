"""The math of Diff-Instruct* (DESIGN.md sections 1-2): pure torch, no Ray, no I/O.

Notation: x_t = a_t x0 + b_t eps with a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t). Networks are
used through their x0-prediction D(x_t); the score is s = (a D - x_t) / b^2. Losses here are
per sample (shape [B]); callers weight and reduce them.

The generator's divergence gradient is split across processes (DESIGN.md section 2):
`reference_side` runs where the reference lives, on detached inputs, and returns D_ref and
g_ref = dL/dx_t through the reference only; `trainer_side` runs on the trainer with D_fake,
x0 and x_t live and D_ref constant, and adds g_ref . x_t. Their sum has the gradient of one
autograd graph over both networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction"]


# --------------------------------------------------------------------------- schedule


def _betas(config: Mapping) -> Tensor:
    """Beta schedule of a diffusers scheduler config (same formulas as DDPMScheduler)."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    kind = config.get("beta_schedule", "linear")
    lo, hi = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 2e-2))
    if kind == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {kind!r} (linear, scaled_linear, squaredcos_cap_v2)")


@dataclass(frozen=True)
class Schedule:
    """The discrete noise schedule of a reference model, from its diffusers scheduler config."""

    alphas_cumprod: Tensor  # [T], float64
    prediction_type: PredictionType = "epsilon"

    @classmethod
    def from_scheduler_config(cls, config: Mapping) -> Schedule:
        pred = config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {pred!r} (epsilon, v_prediction)")
        return cls(torch.cumprod(1.0 - _betas(config), dim=0), pred)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def ab(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """a_t, b_t for integer timesteps t [B], shaped to broadcast against `like` [B, ...]."""
        abar = self.alphas_cumprod.to(t.device)[t].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, b = self.ab(t, x0)
        return a * x0 + b * eps

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output -> epsilon prediction (v = a eps - b x0  =>  eps = a v + b x_t)."""
        if self.prediction_type == "epsilon":
            return output
        a, b = self.ab(t, x_t)
        return a * output + b * x_t

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output -> x0-prediction D(x_t) = (x_t - b eps) / a."""
        a, b = self.ab(t, x_t)
        return (x_t - b * self.to_eps(output, x_t, t)) / a


def timestep_weight(a: Tensor, b: Tensor, kind: Literal["x0", "uniform"]) -> Tensor:
    """w(t). `x0` = b^2/a turns the score-unit loss into x0 units (DESIGN.md section 1)."""
    return b**2 / a if kind == "x0" else torch.ones_like(a)


# --------------------------------------------------------------------------- guidance


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, uncond + w (cond - uncond); linear, so valid for eps, v or D."""
    return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class DivergenceSpec:
    """What the reference side needs to know of the objective; travels with each request."""

    kind: Literal["score", "kl"] = "score"
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float = 1.0
    cfg_scale: float = 1.0
    cfg_placement: Literal["inside", "outside", "none"] = "inside"

    @property
    def needs_uncond(self) -> bool:
        return self.cfg_placement != "none" and self.cfg_scale != 1.0


def reference_x0(d_cond: Tensor, d_uncond: Tensor | None, spec: DivergenceSpec) -> Tensor:
    """The reference x0-prediction used in the divergence: guided only for `inside`."""
    if spec.cfg_placement == "inside" and d_uncond is not None:
        return guided(d_cond, d_uncond, spec.cfg_scale)
    return d_cond


def cfg_outside_grad(d_cond: Tensor, d_uncond: Tensor | None, a: Tensor, b: Tensor, spec: DivergenceSpec) -> Tensor | None:
    """DI*-OUT: the guidance direction as an implicit reward, returned as a gradient w.r.t. x_t.

    Its loss is -(w - 1) (s(x_t, c) - s(x_t, empty)).detach() . x_t; in x0 units the score
    difference is a (D_c - D_empty) / b^2.
    """
    if spec.cfg_placement != "outside" or d_uncond is None:
        return None
    return -(spec.cfg_scale - 1.0) * a * (d_cond - d_uncond).detach() / b**2


# --------------------------------------------------------------------------- divergences


def _per_sample_dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).flatten(1).sum(1)


def distance_grad(y: Tensor, distance: Literal["pseudo_huber", "l2"], c: float) -> Tensor:
    """d'(y) per sample. pseudo-Huber d = sqrt(|y|^2 + c^2) - c; l2 d = |y|^2 / 2 (its c -> inf limit, times c)."""
    if distance == "l2":
        return y
    norm2 = y.pow(2).flatten(1).sum(1)
    return y / (norm2 + c**2).sqrt().view((-1,) + (1,) * (y.dim() - 1))


def distance_value(y: Tensor, distance: Literal["pseudo_huber", "l2"], c: float) -> Tensor:
    """d(y) per sample, for logging the divergence itself."""
    norm2 = y.pow(2).flatten(1).sum(1)
    return norm2 / 2 if distance == "l2" else (norm2 + c**2).sqrt() - c


def score_difference(d_fake: Tensor, d_ref: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """y = s_fake - s_ref in score units, from x0-predictions at the same x_t."""
    return a * (d_fake - d_ref) / b**2


def score_divergence_loss(
    d_fake: Tensor, d_ref: Tensor, x0: Tensor, a: Tensor, b: Tensor, spec: DivergenceSpec
) -> Tensor:
    """DI* tractable loss, per sample, score units: -d'(y) . (s_fake(x_t) - grad log q(x_t|x0)).

    s_fake - grad log q = a (D_fake - x0) / b^2. Whatever is live among d_fake, d_ref and x0
    carries gradient; d'(y) is never detached (that would be a different, wrong gradient).
    """
    y = score_difference(d_fake, d_ref, a, b)
    return -_per_sample_dot(distance_grad(y, spec.distance, spec.huber_c), a * (d_fake - x0) / b**2)


def kl_surrogate(d_fake: Tensor, d_ref: Tensor, x_t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Diff-Instruct / DI++: gradient E (s_fake - s_ref) . dx_t/dtheta, both scores constant."""
    return _per_sample_dot(score_difference(d_fake, d_ref, a, b).detach(), x_t)


# --------------------------------------------------------------------------- the split


def reference_side(
    denoise: Callable[[Tensor], tuple[Tensor, Tensor | None]],
    x_t: Tensor,
    x0: Tensor,
    d_fake: Tensor,
    a: Tensor,
    b: Tensor,
    spec: DivergenceSpec,
) -> tuple[Tensor, Tensor | None]:
    """The reference's part, on detached inputs: returns (D_ref, g_ref = dL/dx_t via the reference).

    `denoise(x)` gives the reference's (D(x, c), D(x, empty) or None). For the score
    divergence, the loss is evaluated with D_fake and x0 held constant and D_ref live; KL
    needs no reference backward. CFG-outside adds its guidance gradient to g_ref.
    """
    x = x_t.detach().requires_grad_(spec.kind == "score")
    with torch.set_grad_enabled(spec.kind == "score"):
        d_cond, d_uncond = denoise(x)
        d_ref = reference_x0(d_cond, d_uncond, spec)
        g_ref = None
        if spec.kind == "score":
            loss = score_divergence_loss(d_fake.detach(), d_ref, x0.detach(), a, b, spec).sum()
            (g_ref,) = torch.autograd.grad(loss, x)
    extra = cfg_outside_grad(d_cond, d_uncond, a, b, spec)
    if extra is not None:
        g_ref = extra if g_ref is None else g_ref + extra
    return d_ref.detach(), g_ref


def trainer_side(
    d_fake: Tensor,
    d_ref: Tensor,
    x0: Tensor,
    x_t: Tensor,
    g_ref: Tensor | None,
    a: Tensor,
    b: Tensor,
    spec: DivergenceSpec,
) -> Tensor:
    """The trainer's part, per sample: the loss with D_ref constant, plus g_ref . x_t."""
    if spec.kind == "score":
        loss = score_divergence_loss(d_fake, d_ref.detach(), x0, a, b, spec)
    else:
        loss = kl_surrogate(d_fake, d_ref, x_t, a, b)
    if g_ref is not None:
        loss = loss + _per_sample_dot(g_ref.detach(), x_t)
    return loss


def weighted_reward_grad(grads: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """sum_k lambda_k dr_k/dx0, the ascent direction of the weighted reward."""
    return sum(weights[name] * g for name, g in grads.items())


def reward_surrogate(x0: Tensor, grads: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Per sample -(sum_k lambda_k g_k) . x0, whose gradient is -sum_k lambda_k dr_k/dx0."""
    return -_per_sample_dot(weighted_reward_grad(grads, weights).to(x0.dtype).detach(), x0)


# --------------------------------------------------------------------------- generator and fake score


def one_step_x0(output: Tensor, z: Tensor, t_star: Tensor, schedule: Schedule) -> Tensor:
    """The one-step generator: z is read as x_{t*}, x0 = (z - b_{t*} eps_theta(z)) / a_{t*}."""
    return schedule.to_x0(output, z, t_star)


def fake_score_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Denoising score matching on detached generator samples, per sample mean squared error."""
    return (eps_pred - eps).pow(2).flatten(1).mean(1)
