"""What the run loop needs from where it runs, and what it hands back.

Two runtimes implement `Runtime`: one process with torch AdamW (distar.run.in_process) and a
Ray Train worker with DeepSpeed engines and the pools on Serve (distar.cluster.train_worker).
Everything else a run does (its cadence, records, validation, stop rule and export) is the
loop's own (distar.run.loop), written once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from distar.errors import RunFailed
from distar.roles.reference_worker import ReferenceRequest, ReferenceResult
from distar.roles.reward_worker import RewardRequest, RewardResult
from distar.roles.trainer import Pending, Update
from distar.run.ema import GeneratorEMA
from distar.run.timing import StepParts

ScoreRewards = Callable[[RewardRequest], Pending[RewardResult]]
QueryReference = Callable[[ReferenceRequest], Pending[ReferenceResult]]


@dataclass
class Progress:
    """What, besides the networks and their optimiser states, a checkpoint must hold to continue identically."""

    step: int = 0  # generator updates done (the next batch is the sampler's batch(step))
    applied: int = 0  # of which applied; the rest were skipped
    skipped_in_a_row: int = 0
    rng: list[int] | None = None  # the noise generator's state
    validations: int = 0  # validations since training began: Tune's scheduler counts time in them
    validation: dict[str, float] = field(default_factory=dict)  # the latest val/* values, in every report
    guard: dict = field(default_factory=dict)  # the guard's state (distar.run.guard.GuardState), rank 0's


@dataclass(frozen=True)
class Outcome:
    """How a run ended: finished with its generator exported, or stopped early, with why."""

    step: int
    generator: Path | None = None
    stopped: str | None = None
    guard: str | None = None  # which generator the guard exported, and why

    def exported(self) -> Path:
        """The exported generator folder; a run that stopped early fails here, with its reason."""
        if self.generator is None:
            raise RunFailed(f"run stopped at step {self.step}: {self.stopped}")
        return self.generator


class Runtime(Protocol):
    rank: int  # this trainer's rank; rank 0 writes records, checkpoint state and the export
    world: int  # trainer ranks; each trains on 1/world of the global batch
    device: torch.device
    ema: GeneratorEMA | None  # the generator's EMA (optim.ema_decay), set by updates(); kept in every checkpoint and snapshot

    def pools(self, cfg, parts) -> tuple[ScoreRewards, QueryReference]:
        """The two pools, called directly (one process) or through Serve."""

    def updates(self, generator: nn.Module, fake: nn.Module, timing: StepParts) -> tuple[Update, Update]:
        """The networks' optimiser steps; the runtime keeps their states for checkpoints (and times its
        own work inside them, DeepSpeed's gathers, on `timing`)."""

    def all_ranks_agree(self, ok: bool) -> bool:
        """True on every rank if `ok` is True on every rank."""

    def gathered(self, module: nn.Module) -> AbstractContextManager:
        """A context in which this rank holds the module's full parameters (read-only)."""

    def restore(self) -> Progress | None:
        """The latest checkpoint's progress, with the networks and optimiser states loaded; None to start afresh."""

    def save(self, progress: Progress, report: dict[str, float]) -> None:
        """Checkpoint the networks, optimiser states and progress (every rank takes part)."""

    def snapshot(self) -> None:
        """Keep the networks and optimiser states as the guard's kept generator (every rank takes part)."""

    def rewind(self) -> None:
        """Load the guard's kept generator back (every rank takes part)."""

    def report(self, report: dict[str, float]) -> None:
        """Tell whoever watches the run (Tune's scheduler) the latest values."""

    def step_done(self, seconds: float, samples: int, values: dict[str, float], parts: dict[str, dict[str, float]], skipped_total: int) -> None:
        """Telemetry of one step on rank 0: its time by part (run.timing.StepParts.take()), throughput and values."""
