"""Reward models: each maps images in [0, 1] (differentiably) and prompts to one score per image.

`REWARDS` is the registry: the config's reward names are its keys (config.py takes its
choices from here), each naming the wrapper that loads it and the package it needs beyond the
project's own. Wrappers are imported only when a reward loads, so reading a config imports no
torch. Each wrapper's module docstring describes the folder it loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from distar.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor


class RewardModel(Protocol):
    """Frozen scorer: images [B, 3, H, W] in [0, 1] and prompts -> scores [B], differentiable with
    respect to the images (preprocessing happens in torch, never through PIL)."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...

    def to(self, device) -> RewardModel: ...  # every reward is an nn.Module


class MissingPackageError(UserError):
    """A reward model whose package is not installed (or does not import)."""


class MissingProcessorError(UserError):
    """A reward folder without the tokenizer and preprocessing config its wrapper reads, and no
    processor source named; `field` is where to name one."""

    def __init__(self, folder: Path, field: str = "rewards.N.processor"):
        self.folder = folder
        super().__init__(f"{folder} has no tokenizer (tokenizer.json, tokenizer_config.json or vocab.json); set {field} to a folder "
                         "or hub id with the tokenizer and preprocessing config (PickScore_v1's: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")


@dataclass(frozen=True)
class Entry:
    wrapper: str  # "module:Class" with a from_pretrained(folder, **options)
    options: dict = field(default_factory=dict)
    needs: tuple[str, str, str] | None = None  # (module, pip name, why) of a package the project does not install
    processor: bool = False  # its tokenizer and preprocessing config may come from a folder of their own

    def load(self, folder: Path, processor: Path | None = None) -> RewardModel:
        """The wrapper's model from `folder`; `processor`, a folder with the tokenizer and
        preprocessing config, where `folder` has none (default: folder)."""
        if self.needs is not None:
            _check_package(*self.needs)
        options = dict(self.options)
        if processor is not None:
            if not self.processor:
                raise UserError(f"{self.wrapper} reads no tokenizer or preprocessing config: it takes no processor source")
            options["processor"] = Path(processor)
        module, name = self.wrapper.split(":")
        return getattr(importlib.import_module(module), name).from_pretrained(folder, **options)


REWARDS: dict[str, Entry] = {
    "pickscore": Entry("distar.rewards.clip:ClipReward", {"kind": "pickscore"}, processor=True),
    "clip_score": Entry("distar.rewards.clip:ClipReward", {"kind": "clip_score"}, processor=True),
    "hpsv2": Entry("distar.rewards.hpsv2:HpsReward",
                   needs=("open_clip", "open-clip-torch", "HPSv2.1 is an open_clip ViT-H-14, which transformers cannot build")),
    "image_reward": Entry("distar.rewards.image_reward:BlipReward",
                          needs=("ImageReward", "image-reward", "ImageReward's BLIP model comes from that package; transformers cannot build it")),
    "aesthetic": Entry("distar.rewards.aesthetic:AestheticReward"),
}
REWARD_NAMES = tuple(REWARDS)


def _check_package(module: str, pip_name: str, why: str) -> None:
    """A missing optional package is one clear line, not an ImportError deep in a wrapper."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == module:
            raise MissingPackageError(f"this reward needs the {pip_name} package: pip install {pip_name} ({why})") from None
        # Installed, but it (or one of its own imports) fails: say so rather than "install it".
        raise MissingPackageError(f"{pip_name} is installed but does not import ({e}); {why}") from e


def load_reward(name: str, folder: str | Path, processor: str | Path | None = None) -> RewardModel:
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    return REWARDS[name].load(Path(folder), None if processor is None else Path(processor))
