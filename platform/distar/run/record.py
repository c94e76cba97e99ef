"""What a run prints and records, in any runtime: the step line, and the grids of fixed prompts
and noise and the per-step values it writes to MLflow."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from distar.data import spread
from distar.images import grid
from distar.models.diffusion import DiffusionParts, OneStepGenerator
from distar.tracking.runs import RunTarget, StepLogger

GRID_SIZE = 8  # prompts (columns) in the before/after grid


def grid_prompts(prompts: list[str]) -> list[str]:
    return spread(prompts, GRID_SIZE)


@torch.no_grad()
def one_step_latents(generator: OneStepGenerator, conditioner, latent_shape: tuple[int, int, int], prompts: list[str], seed: int,
                     chunk: int) -> torch.Tensor:
    """The generator's x0 latents for fixed prompts and the noise of `seed`, `chunk` prompts a forward."""
    z = torch.randn(len(prompts), *latent_shape, generator=torch.Generator().manual_seed(seed))
    device = next(generator.parameters()).device
    return torch.cat([generator(z[i : i + chunk].to(device), conditioner(prompts[i : i + chunk])) for i in range(0, len(prompts), chunk)])


@torch.no_grad()
def sample_images(generator: OneStepGenerator, parts: DiffusionParts, latent_shape: tuple[int, int, int], prompts: list[str], seed: int) -> torch.Tensor:
    """The generator's images for fixed prompts and noise, decoded to [0, 1]."""
    x0 = one_step_latents(generator, parts.conditioner, latent_shape, prompts, seed, len(prompts))
    return parts.decode(x0).cpu()


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class StepLine:
    """`step k/N | metrics | rate | ETA`, with the rate measured since this process started training."""

    def __init__(self, first: int, steps: int):
        self.first, self.steps, self.start = first, steps, time.perf_counter()

    def __call__(self, done: int, metrics: dict[str, float]) -> str:
        rate = (done - self.first) / (time.perf_counter() - self.start)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        return f"step {done}/{self.steps} | {shown} | {rate:.2f} step/s | ETA {_eta((self.steps - done) / rate)}"


def validation_line(step: int, values: dict[str, float]) -> str:
    return f"validation at step {step} | " + " ".join(f"{k.removeprefix('val/')}={v:.4g}" for k, v in values.items())


class RunRecord:
    """What a run writes to MLflow, the same in one process and on Ray Train: every step's values
    with samples/s, and a grid of fixed prompts and noise at the start, every
    `tracking.grid_every` updates and at the end. `sample` runs wherever the record asks for a
    grid (on Ray, on every rank: ZeRO-3 forwards are collective); only a record with a target
    (rank 0 of a tracked run) writes."""

    def __init__(self, target: RunTarget | None, shown: list[str], sample: Callable[[], torch.Tensor], every: int, last: int):
        self.shown, self.sample, self.every, self.last = shown, sample, every, last
        self.logger = StepLogger(target) if target is not None else None
        if self.logger is not None:
            self.logger.text("\n".join(shown), "grid_prompts.txt")

    def grid(self, step: int) -> torch.Tensor:
        images = self.sample()
        if self.logger is not None:
            self.logger.grid(step, grid(images, columns=len(self.shown)))
        return images

    def step(self, step: int, values: dict[str, float], seconds: float, samples: int) -> None:
        if self.logger is not None:
            self.logger.step(step, {**values, "samples_per_s": samples / seconds})
        if step % self.every == 0 and step != self.last:  # the last step's grid is the final one
            self.grid(step)

    def validated(self, step: int, values: dict[str, float]) -> None:
        """Sent at once with everything before it: Tune's scheduler may stop the run on these values."""
        if self.logger is not None:
            self.logger.step(step, values)
            self.logger.flush()

    def note(self, key: str, text: str) -> None:
        """A tag on the run (what the MLflow UI shows beside its metrics)."""
        if self.logger is not None:
            self.logger.tag(key, text)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
