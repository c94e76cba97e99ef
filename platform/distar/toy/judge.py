"""Judging generators in the shapes world: held-out prompts, the reader's verdict, generation time.

Used by the asset builder (is the reference a good teacher?), the quality benchmark (does DI*
beat it?) and evaluation. Timing is measured side by side in one process, so ratios are fair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distar.toy import world
from distar.toy.reader import Reader

HELD_OUT_SEED = 30_000  # prompts and noise of evaluation never meet training's seeds


def held_out_prompts(n: int, seed: int = HELD_OUT_SEED) -> list[str]:
    rng = np.random.default_rng(seed)
    return [world.all_prompts()[i] for i in rng.integers(0, len(world.all_prompts()), n)]


@dataclass
class Verdict:
    accuracy: dict[str, float]  # size, color, shape, position, all
    pref: float  # mean reader pref
    seconds_per_image: float
    network_calls: int  # UNet evaluations per image

    def row(self) -> dict[str, float]:
        return {**self.accuracy, "pref": self.pref, "s/image": self.seconds_per_image, "unet calls": self.network_calls}


def judge(
    folder: str | Path, prompts: list[str], reader: Reader, steps: int = 50, cfg: float = 3.0, seed: int = HELD_OUT_SEED
) -> tuple[Verdict, torch.Tensor]:
    """Sample `folder` on prompts (one step if it is a one-step generator), time it, read it.
    Returns the verdict and the images."""
    from distar.models.sampling import ImageModel

    model = ImageModel(folder, steps, cfg, world.SIZE)
    seeds = range(seed, seed + len(prompts))
    model.generate(prompts[:2], seeds[:2])  # warm-up: first calls allocate
    start = time.perf_counter()
    images = model.generate(prompts, seeds)
    seconds = (time.perf_counter() - start) / len(prompts)
    reading = reader.read(images)
    return Verdict(reading.accuracy(prompts), float(np.mean(reading.pref)), seconds, model.network_calls), images


def markdown(rows: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")
    return "\n".join(lines)
