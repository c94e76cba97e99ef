"""The guard against reward hacking (run.guard): held-out judges watched at every validation.

Reward hacking shows as the training reward rising while what the run does not optimise falls:
a held-out reward (weight 0), a distribution metric, the shapes world's faithfulness check. At
each validation every judge is compared with its own best value so far; one worse than that by
more than its margin has fallen. A validation whose training reward (the weighted sum of the
trained rewards on the validation prompts) is above the kept generator's while a judge has fallen
is a strike; `patience` strikes in a row trip the guard, which rolls the run back to the kept
generator (up to `max_rollbacks` times) or stops it there (`action`).

The kept generator is the validated one with the highest training reward among those where no
judge had fallen; the first validation (the untrained generator) is kept by definition. With the
guard on, the kept generator is the one a run exports and registers, and its val/* values are
the run's last report (what a sweep selects on).

Only bookkeeping here, on rank 0's validation values; the run loop (distar.run.loop) keeps and
restores the weights the guard names, on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from distar.config import GuardSection, RewardSpec, RunConfig
from distar.evaluation.judges import lower_is_better

FOLDER = "guard"  # under run.output_dir: the kept generator's weights and optimiser states


def folder(cfg: RunConfig) -> Path:
    """Where a run keeps the kept generator (both networks and their optimiser states): a folder of
    its output_dir, which every trainer rank must see (one node, or a shared file system)."""
    return Path(cfg.run.output_dir) / FOLDER


@dataclass
class GuardState:
    """What the guard remembers between validations; it travels in every checkpoint's progress."""

    best: dict[str, float] = field(default_factory=dict)  # each judge's best value so far, signed so that higher is better
    kept_step: int | None = None
    kept_reward: float = -math.inf
    kept_values: dict[str, float] = field(default_factory=dict)  # the kept generator's val/* values
    strikes: int = 0  # strikes in a row
    rollbacks: int = 0
    trips: list[str] = field(default_factory=list)  # why the guard tripped, each time


@dataclass(frozen=True)
class Verdict:
    keep: bool  # this validation's generator becomes the kept one
    action: str | None = None  # "rollback" or "stop" when the guard trips
    reason: str | None = None


def training_reward(rewards: list[RewardSpec], values: dict[str, float]) -> float:
    """The weighted sum of the trained rewards (weight > 0) on the validation prompts."""
    return sum(r.weight * values[f"val/reward/{r.name}"] for r in rewards if r.weight > 0)


class Guard:
    def __init__(self, spec: GuardSection, rewards: list[RewardSpec], state: dict | None = None):
        self.spec, self.rewards = spec, rewards
        self.state = GuardState(**state) if state else GuardState()

    def saved(self) -> dict:
        return dataclasses.asdict(self.state)

    def observe(self, step: int, values: dict[str, float]) -> Verdict:
        """Judge the validation at `step` (its val/* values) and say what the run must do."""
        s, reward = self.state, training_reward(self.rewards, values)
        fallen = []
        for name, margin in self.spec.judges.items():
            sign = -1.0 if lower_is_better(name) else 1.0
            value = values[f"val/{name}"]
            best = s.best.get(name)
            if not math.isfinite(value) or (best is not None and sign * value < best - margin):
                fallen.append(f"{name} {value:.4g} (best {sign * best if best is not None else math.nan:.4g}, margin {margin:g})")
            if math.isfinite(value):
                s.best[name] = sign * value if best is None else max(best, sign * value)
        if not fallen and math.isfinite(reward) and (s.kept_step is None or reward >= s.kept_reward):
            s.kept_step, s.kept_reward, s.kept_values, s.strikes = step, reward, dict(values), 0
            return Verdict(keep=True)
        s.strikes = s.strikes + 1 if fallen and reward > s.kept_reward else 0
        if s.strikes < self.spec.patience:
            return Verdict(keep=False)
        s.strikes = 0
        rollback = self.spec.action == "rollback" and s.rollbacks < self.spec.max_rollbacks
        s.rollbacks += rollback
        reason = (f"at step {step} the training reward {reward:.4g} was above the kept generator's {s.kept_reward:.4g} "
                  f"(step {s.kept_step}) while {', '.join(fallen)} had fallen, {self.spec.patience} validation(s) in a row; "
                  + (f"rolled back to step {s.kept_step} (rollback {s.rollbacks} of {self.spec.max_rollbacks})" if rollback
                     else f"stopped with the generator of step {s.kept_step}"))
        s.trips.append(reason)
        return Verdict(keep=False, action="rollback" if rollback else "stop", reason=reason)
