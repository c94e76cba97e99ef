"""Reward models: each maps images in [0, 1] (differentiably) and prompts to one score per image.

`load_reward(name, folder)` is the registry; the config's reward names are its keys. Each
wrapper's module docstring describes the folder it loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from torch import Tensor

from distar.errors import UserError
from distar.rewards.aesthetic import AestheticReward
from distar.rewards.clip import ClipReward
from distar.rewards.hpsv2 import HpsReward
from distar.rewards.image_reward import BlipReward


class RewardModel(Protocol):
    """Frozen scorer: images [B, 3, H, W] in [0, 1] and prompts -> scores [B], differentiable with
    respect to the images (preprocessing happens in torch, never through PIL)."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...

    def to(self, device) -> RewardModel: ...  # every reward is an nn.Module


class MissingPackageError(UserError):
    """A reward model whose package is not installed (or does not import); str() is the message to print."""


def _needs(module: str, pip_name: str, why: str, load: Callable[[Path], RewardModel]) -> Callable[[Path], RewardModel]:
    """`load`, preceded by a check that `module` imports, so a missing package is one clear line."""

    def loader(folder: Path) -> RewardModel:
        try:
            importlib.import_module(module)
        except ImportError as e:
            if isinstance(e, ModuleNotFoundError) and e.name == module:
                raise MissingPackageError(f"this reward needs the {pip_name} package: pip install {pip_name} ({why})") from None
            # Installed, but it (or one of its own imports) fails: say so rather than "install it".
            raise MissingPackageError(f"{pip_name} is installed but does not import ({e}); {why}") from e
        return load(folder)

    return loader


LOADERS: dict[str, Callable[[Path], RewardModel]] = {
    "pickscore": lambda folder: ClipReward.from_pretrained(folder, kind="pickscore"),
    "clip_score": lambda folder: ClipReward.from_pretrained(folder, kind="clip_score"),
    "aesthetic": AestheticReward.from_pretrained,
    "hpsv2": _needs("open_clip", "open-clip-torch", "HPSv2.1 is an open_clip ViT-H-14, which transformers cannot build", HpsReward.from_pretrained),
    "image_reward": _needs("ImageReward", "image-reward", "ImageReward's BLIP model comes from that package; transformers cannot build it", BlipReward.from_pretrained),
}


def load_reward(name: str, folder: str | Path) -> RewardModel:
    if name not in LOADERS:
        raise UserError(f"unknown reward {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](Path(folder))


__all__ = ["RewardModel", "MissingPackageError", "load_reward", "LOADERS"]
