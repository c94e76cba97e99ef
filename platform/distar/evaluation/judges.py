"""What scores generated images: reward models by name, and in the shapes world its reader.

The same judges score validation during training, evaluation side by side, the quality
benchmark and the toy build's check of its reference, so every one of them means the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

ACCURACIES = ("size", "color", "shape", "position", "all")
WORLD = ("world/misplaced", "world/off_world")  # the world-faithfulness check's mean share and off-world share
MANIFOLD = ("precision", "recall", "density", "coverage")  # distar.evaluation.distribution.manifold's
WORLD_RENDERS = 4  # world images per prompt that generated ones are compared with
READER_SIZE = 32  # distar.toy.world.SIZE: the reader reads 32x32 images only
LOWER_IS_BETTER = ("world/misplaced", "world/off_world", "world/fid", "ref/fid")  # of every other judge, higher is better


def lower_is_better(metric: str) -> bool:
    """Whether the smaller value of a judge's metric is the better one (with or without a prefix: val/world/fid)."""
    return metric.endswith(LOWER_IS_BETTER)


def reader_reads(prompts: Sequence[str], resolution: int) -> bool:
    """Whether the shapes-world reader can judge these images: every prompt is the world's and the
    images are its size. Decided without loading the reader."""
    from distar.toy import world

    return bool(prompts) and resolution == READER_SIZE and all(world.is_world_prompt(p) for p in prompts)


def reader_metrics(n: int) -> list[str]:
    """What the shapes world's judges report on n images: the reader's mean pref and an alignment
    accuracy per attribute, the world-faithfulness check's (distar.toy.faithfulness), and the
    distribution metrics against world renders of the same prompts (FID from FID_MIN images)."""
    return ["pref"] + [f"acc/{k}" for k in ACCURACIES] + list(WORLD) + distribution_metrics("world", n)


def distribution_metrics(against: str, n: int) -> list[str]:
    """`<against>/<metric>` for n generated images: the manifold metrics, and FID from FID_MIN images."""
    from distar.evaluation.distribution import FID_MIN

    return [f"{against}/{k}" for k in MANIFOLD] + ([f"{against}/fid"] if n >= FID_MIN else [])


def world_distribution(reader, images, prompts: Sequence[str]) -> dict[str, float]:
    """Generated images [N, 3, 32, 32] against WORLD_RENDERS world renders of each of their prompts
    (the world's own sampler at the held-out seed: the same renders for every model), on the
    reader's features: precision, recall, density, coverage, and FID from FID_MIN images."""
    from distar.data import HELD_OUT_SEED
    from distar.evaluation import distribution
    from distar.toy import world
    from distar.toy.reader import to_tensor

    renders, _ = world.sample(len(prompts) * WORLD_RENDERS, HELD_OUT_SEED, list(prompts) * WORLD_RENDERS)
    return {f"world/{k}": v for k, v in distribution.compare(reader.features(to_tensor(renders)), reader.features(images)).items()}


def load_reader(prompts: Sequence[str]):
    """The shapes-world reader when every prompt is the shapes world's, else None."""
    if not reader_reads(prompts, READER_SIZE):
        return None
    from distar.toy import assets
    from distar.toy.reader import Reader

    return Reader.load(assets.path("reader"))


@dataclass
class Judges:
    """Reward models by name (images in [0, 1] and prompts -> scores), and the reader (or None)."""

    rewards: dict[str, Callable] = field(default_factory=dict)
    reader: object | None = None
    device: str = "cpu"
    batch: int = 64

    def score(self, images, prompts: list[str]) -> dict[str, float]:
        """`reward/<name>` means; with the reader and images of its size, `pref`, `acc/*` and `world/*`."""
        import torch

        out: dict[str, float] = {}
        with torch.no_grad():
            for name, reward in self.rewards.items():
                scores = [reward(images[i : i + self.batch].to(self.device), prompts[i : i + self.batch]).float().cpu()
                          for i in range(0, len(prompts), self.batch)]
                out[f"reward/{name}"] = float(torch.cat(scores).mean())
        if self.reader is not None and tuple(images.shape[-2:]) == (READER_SIZE, READER_SIZE):
            from distar.toy import faithfulness

            images = images.cpu()
            reading = self.reader.read(images)
            out["pref"] = float(np.mean(reading.pref))
            out.update({f"acc/{k}": v for k, v in reading.accuracy(prompts).items()})
            fit = faithfulness.check(images)
            out.update(zip(WORLD, (float(fit.misplaced.mean()), float(fit.off_world.float().mean()))))
            out.update(world_distribution(self.reader, images, prompts))
        return out


def load_judges(cfg, prompts: Sequence[str], device: str = "cpu") -> Judges:
    """The run config's reward models (on `device`), and the toy reader when the prompts are the
    shapes world's."""
    from distar.run.build import reward_models

    return Judges(reward_models(cfg, device), load_reader(prompts), device)
