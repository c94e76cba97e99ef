"""Reward models: each maps images in [0, 1] (differentiably) and prompts to one score per image.

`load_reward(name, folder)` is the registry; the config's reward names are its keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor

from distar.rewards.clip import ClipReward


class RewardModel(Protocol):
    """Frozen scorer: images [B, 3, H, W] in [0, 1] and prompts -> scores [B], differentiable with
    respect to the images (preprocessing happens in torch, never through PIL)."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


LOADERS = {
    "pickscore": lambda folder: ClipReward.from_pretrained(folder, kind="pickscore"),
    "clip_score": lambda folder: ClipReward.from_pretrained(folder, kind="clip_score"),
}


def load_reward(name: str, folder: str | Path) -> RewardModel:
    if name not in LOADERS:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](Path(folder))


__all__ = ["RewardModel", "load_reward", "LOADERS"]
