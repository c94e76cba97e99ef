"""Trainer step: holds the generator and the fake score; one DI* update per call.

The generator's gradient is assembled from three parts (DESIGN.md section 2): the reward
surrogate from the reward worker's gradients, the trainer's side of the divergence with
D_fake live, and g_ref . x_t from the reference pool. Each remote part sees detached tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn

from distar.config import ObjectiveSection, OptimSection, RewardSpec
from distar.models.diffusion import Cond, Denoiser, OneStepGenerator, TextConditioner
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
from distar.roles.reference_worker import ReferenceRequest, ReferenceResult
from distar.roles.reward_worker import RewardRequest, RewardResult

T = TypeVar("T", covariant=True)
# Back-propagate a loss and step one network; returns its gradient norm, non-finite (on every
# rank alike) when the gradient was not finite and the step was skipped.
Update = Callable[[Tensor], float]


class Pending(Protocol[T]):
    """What a pool returns for a call still in flight (a Later in one process, a retrying Serve call on Ray)."""

    def result(self) -> T: ...


def divergence_spec(objective: ObjectiveSection) -> DivergenceSpec:
    return DivergenceSpec(
        kind=objective.divergence, distance=objective.distance, huber_c=objective.huber_c,
        cfg_scale=objective.cfg_scale, cfg_placement=objective.cfg_placement,
    )


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


class Later(Generic[T]):
    """An in-process pool's pending result: the work runs when the trainer asks for it, so it is
    timed where a run on Ray would wait for it."""

    def __init__(self, call: Callable[[], T]):
        self.call = call

    def result(self) -> T:
        return self.call()


@dataclass
class Draw:
    """The randomness of one generator or fake-score update."""

    z: Tensor
    t: Tensor
    eps: Tensor

    def __getitem__(self, rows: slice) -> Draw:
        return Draw(self.z[rows], self.t[rows], self.eps[rows])


@dataclass
class Sample:
    """The generator's sample of one draw for this rank's prompts, with their conditioning and the
    sample's pending rewards."""

    prompts: list[str]
    draw: Draw
    cond: Cond
    x0: Tensor
    rewards: Pending[RewardResult]


@dataclass(frozen=True)
class Shard:
    """This trainer's rows of the global batch. Every rank draws the whole batch's randomness from
    the same generator and keeps its slice, so any number of ranks computes the same update."""

    rank: int = 0
    world: int = 1

    def rows(self, n: int) -> slice:
        if n % self.world:
            raise ValueError(f"global batch {n} does not split over {self.world} trainer workers")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


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
        score_rewards: Callable[[RewardRequest], Pending[RewardResult]],
        query_reference: Callable[[ReferenceRequest], Pending[ReferenceResult]],
        updates: tuple[Update, Update],
        shard: Shard = Shard(),
        all_ranks_agree: Callable[[bool], bool] = lambda ok: ok,
    ):
        """score_rewards and query_reference return at once with a pending result (scoring overlaps the fake forward).
        updates: the generator's and the fake score's (torch AdamW in one process, DeepSpeed
        engines on Ray Train). all_ranks_agree: True only if every trainer rank passes True (the
        skip decision must be the same on all ranks: ZeRO-3 runs every backward as a collective)."""
        self.generator, self.fake, self.conditioner = generator, fake, conditioner
        self.latent_shape, self.objective, self.optim = latent_shape, objective, optim
        self.weights = {r.name: r.weight for r in rewards}
        self.spec = divergence_spec(objective)
        self.score_rewards, self.query_reference = score_rewards, query_reference
        self.schedule = generator.schedule
        self.gen_update, self.fake_update = updates
        self.shard, self.all_ranks_agree = shard, all_ranks_agree

    def step(self, prompts: list[str], rng: torch.Generator) -> dict[str, float]:
        """K fake-score updates, then one generator update, all on the same global batch of prompts
        (this rank trains on its shard). An update whose loss, reward or gradient is not finite on
        any rank is skipped on all of them; metrics["skipped"] is then 1.

        The generator's sample goes to the reward pool before the fake score trains: it does not
        depend on the fake score, so scoring overlaps the K updates (the price: the sample's
        activations are held through them)."""
        n, rows = len(prompts), self.shard.rows(len(prompts))
        prompts, skipped = prompts[rows], False
        fake_draws = [self.draw(n, rng)[rows] for _ in range(self.optim.fake_updates_per_step)]
        sample = self.sample(prompts, self.draw(n, rng)[rows])
        for d in fake_draws:
            fake_loss = self.fake_loss(sample.cond, d)
            if not (self.all_ranks_agree(_finite(fake_loss)) and math.isfinite(self.fake_update(fake_loss))):
                skipped = True
        # The fake score stays frozen through the generator's backward too: its parameters must
        # get no gradient (and, under ZeRO-3, no gradient reduction) from the generator loss.
        with frozen(self.fake):
            loss, metrics = self.generator_loss(sample)
            rewards_finite = all(math.isfinite(v) for k, v in metrics.items() if k.startswith("reward/"))
            if self.all_ranks_agree(_finite(loss) and rewards_finite):
                metrics["grad_norm/generator"] = self.gen_update(loss)
                skipped |= not math.isfinite(metrics["grad_norm/generator"])
            else:
                skipped = True
        metrics["loss/fake_score"] = fake_loss.item()
        metrics["skipped"] = float(skipped)
        return metrics

    def draw(self, batch: int, rng: torch.Generator) -> Draw:
        device = next(self.generator.parameters()).device
        z = torch.randn(batch, *self.latent_shape, generator=rng).to(device)
        t = torch.randint(self.objective.t_min, self.objective.t_max + 1, (batch,), generator=rng).to(device)
        eps = torch.randn(batch, *self.latent_shape, generator=rng).to(device)
        return Draw(z, t, eps)

    def sample(self, prompts: list[str], d: Draw) -> Sample:
        """The generator's sample of `d` (with its graph), already sent to the reward pool."""
        cond = self.conditioner(prompts)
        x0 = self.generator(d.z, cond)
        return Sample(prompts, d, cond, x0, self.score_rewards(RewardRequest(x0.detach(), prompts)))

    def generator_loss(self, sample: Sample) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss whose gradient w.r.t. the generator is the DI* gradient at `sample`; and its metrics."""
        prompts, d, cond, x0 = sample.prompts, sample.draw, sample.cond, sample.x0
        loss, metrics = torch.zeros(len(prompts), dtype=x0.dtype, device=x0.device), {}
        if self.objective.alpha > 0:
            x_t = self.schedule.add_noise(x0, d.eps, d.t)
            a, b = self.schedule.ab(d.t, x0)
            d_fake = self.fake(x_t, d.t, cond)  # frozen by step(): gradient flows through its input only
            ref = self.query_reference(ReferenceRequest(x_t.detach(), d.t, prompts, x0.detach(), d_fake.detach(), self.spec)).result()
            w = self.objective.alpha * timestep_weight(a, b, self.objective.weighting).flatten()
            loss = w * trainer_side(d_fake, ref.d_ref, x0, x_t, ref.g_ref, a, b, self.spec)
            y = score_difference(d_fake.detach(), ref.d_ref, a, b)
            metrics["divergence"] = distance_value(y, self.spec.distance, self.spec.huber_c).mean().item()
        rewards = sample.rewards.result()
        loss = (loss + reward_surrogate(x0, rewards.grads, self.weights)).mean()
        metrics.update({f"reward/{k}": v.mean().item() for k, v in rewards.rewards.items()})
        # Per-sample size of the reward's pull on x0: what reward weights are balanced against.
        metrics["grad_norm/reward"] = weighted_reward_grad(rewards.grads, self.weights).flatten(1).norm(dim=1).mean().item()
        metrics["loss/generator"] = loss.item()
        return loss, metrics

    def fake_loss(self, cond: Cond, d: Draw) -> Tensor:
        """Denoising score matching of the fake score on fresh, detached generator samples."""
        with torch.no_grad():
            x0 = self.generator(d.z, cond)
        x_t = self.schedule.add_noise(x0, d.eps, d.t)
        return fake_score_loss(self.fake.eps(x_t, d.t, cond), d.eps).mean()
