"""Trainer step: holds the generator and the fake score; one DI* update per call.

The generator's gradient is assembled from three parts (DESIGN.md section 2): the reward
surrogate from the reward worker's gradients, the trainer's side of the divergence with
D_fake live, and g_ref . x_t from the reference pool. Each remote part sees detached tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distar.config import ObjectiveSection, OptimizerSpec, OptimSection, RewardSpec
from distar.models.diffusion import Denoiser, OneStepGenerator, TextConditioner
from distar.objectives import (
    DivergenceSpec,
    distance_value,
    fake_score_loss,
    reward_surrogate,
    score_difference,
    timestep_weight,
    trainer_side,
    weighted_reward_grad,
)
from distar.roles.reference_pool import ReferenceRequest, ReferenceResult
from distar.roles.reward_worker import RewardResult


def divergence_spec(objective: ObjectiveSection) -> DivergenceSpec:
    return DivergenceSpec(
        kind=objective.divergence, distance=objective.distance, huber_c=objective.huber_c,
        cfg_scale=objective.cfg_scale, cfg_placement=objective.cfg_placement,
    )


def _adam(params, spec: OptimizerSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Gradient flows through the module's inputs but never lands in its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@dataclass
class Draw:
    """The randomness of one generator or fake-score update."""

    z: Tensor
    t: Tensor
    eps: Tensor


class TrainerStep:
    def __init__(
        self,
        generator: OneStepGenerator,
        fake: Denoiser,
        conditioner: TextConditioner,
        latent_shape: tuple[int, int, int],
        objective: ObjectiveSection,
        rewards: list[RewardSpec],
        optim: OptimSection,
        score_rewards: Callable[[Tensor, list[str]], RewardResult],
        query_reference: Callable[[ReferenceRequest], ReferenceResult],
    ):
        self.generator, self.fake, self.conditioner = generator, fake, conditioner
        self.latent_shape, self.objective, self.optim = latent_shape, objective, optim
        self.weights = {r.name: r.weight for r in rewards}
        self.spec = divergence_spec(objective)
        self.score_rewards, self.query_reference = score_rewards, query_reference
        self.schedule = generator.schedule
        self.gen_opt = _adam(generator.parameters(), optim.generator)
        self.fake_opt = _adam(fake.parameters(), optim.fake_score)

    def step(self, prompts: list[str], rng: torch.Generator) -> dict[str, float]:
        """K fake-score updates, then one generator update, all on the same prompts."""
        n = len(prompts)
        for _ in range(self.optim.fake_updates_per_step):
            fake_loss = self.fake_loss(prompts, self.draw(n, rng))
            self._apply(self.fake_opt, self.fake, fake_loss)
        loss, metrics = self.generator_loss(prompts, self.draw(n, rng))
        metrics["grad_norm/generator"] = self._apply(self.gen_opt, self.generator, loss)
        metrics["loss/fake_score"] = fake_loss.item()
        return metrics

    def _apply(self, opt: torch.optim.Optimizer, module: nn.Module, loss: Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.optim.grad_clip if self.optim.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        return norm.item()

    def draw(self, batch: int, rng: torch.Generator) -> Draw:
        device = next(self.generator.parameters()).device
        z = torch.randn(batch, *self.latent_shape, generator=rng).to(device)
        t = torch.randint(self.objective.t_min, self.objective.t_max + 1, (batch,), generator=rng).to(device)
        eps = torch.randn(batch, *self.latent_shape, generator=rng).to(device)
        return Draw(z, t, eps)

    def generator_loss(self, prompts: list[str], d: Draw) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss whose gradient w.r.t. the generator is the DI* gradient; and its metrics."""
        cond = self.conditioner(prompts)
        x0 = self.generator(d.z, cond)
        rewards = self.score_rewards(x0.detach(), prompts)
        loss = reward_surrogate(x0, rewards.grads, self.weights)
        metrics = {f"reward/{k}": v.mean().item() for k, v in rewards.rewards.items()}
        # Per-sample size of the reward's pull on x0: what reward weights are balanced against.
        metrics["grad_norm/reward"] = weighted_reward_grad(rewards.grads, self.weights).flatten(1).norm(dim=1).mean().item()
        if self.objective.alpha > 0:
            x_t = self.schedule.add_noise(x0, d.eps, d.t)
            a, b = self.schedule.ab(d.t, x0)
            with frozen(self.fake):
                d_fake = self.fake(x_t, d.t, cond)
            ref = self.query_reference(ReferenceRequest(x_t.detach(), d.t, prompts, x0.detach(), d_fake.detach(), self.spec))
            w = self.objective.alpha * timestep_weight(a, b, self.objective.weighting).flatten()
            loss = loss + w * trainer_side(d_fake, ref.d_ref, x0, x_t, ref.g_ref, a, b, self.spec)
            y = score_difference(d_fake.detach(), ref.d_ref, a, b)
            metrics["divergence"] = distance_value(y, self.spec.distance, self.spec.huber_c).mean().item()
        loss = loss.mean()
        metrics["loss/generator"] = loss.item()
        return loss, metrics

    def fake_loss(self, prompts: list[str], d: Draw) -> Tensor:
        """Denoising score matching of the fake score on fresh, detached generator samples."""
        cond = self.conditioner(prompts)
        with torch.no_grad():
            x0 = self.generator(d.z, cond)
        x_t = self.schedule.add_noise(x0, d.eps, d.t)
        return fake_score_loss(self.fake.eps(x_t, d.t, cond), d.eps).mean()
