"""What a run prints and leaves behind, the same in one process and on Ray Train: the step line,
the before/after grid of fixed prompts and noise, and the config it ran with."""

from __future__ import annotations

import time

import torch

from distar.models.diffusion import DiffusionParts, OneStepGenerator

GRID_SIZE = 8  # prompts (columns) in the before/after grid


def grid_prompts(prompts: list[str]) -> list[str]:
    """GRID_SIZE prompts spread over the prompt list."""
    return [prompts[i * len(prompts) // GRID_SIZE] for i in range(min(GRID_SIZE, len(prompts)))]


@torch.no_grad()
def sample_images(generator: OneStepGenerator, parts: DiffusionParts, latent_shape: tuple[int, int, int], prompts: list[str], seed: int) -> torch.Tensor:
    """The generator's images for fixed prompts and noise, decoded to [0, 1]."""
    z = torch.randn(len(prompts), *latent_shape, generator=torch.Generator().manual_seed(seed))
    device = next(generator.parameters()).device
    return parts.decode(generator(z.to(device), parts.conditioner(prompts)).to(parts.vae.dtype)).cpu()


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
