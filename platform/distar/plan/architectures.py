"""Which architectures a run's roles hold, as config dicts: read from the run's sources without a download.

- A local folder (and `toy`, the shipped world's folders) is read as its loaders would read it:
  the pipeline's unet/, vae/, text_encoder(_2)/ config.json and scheduler config; a reward's CLIP config.json.
- `tiny-random` builds the tiny model (distar.models.tiny) in a temporary folder and reads that.
- A hub id (or s3:// prefix) of family sd15 or sdxl is that family's published architecture
  (distar.models.published), and a reward's hub CLIP one of published.HUB_CLIPS; anything else
  cannot be planned (CannotPlan, exit 2): hpsv2 and image_reward come from packages without
  configs, and an unknown hub repository's architecture is unknown until downloaded.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distar.config import RunConfig
from distar.errors import UserError
from distar.models import published, sources, tiny
from distar.storage import cache_dir


class CannotPlan(UserError):
    """A model whose architecture the plan cannot know without downloading or building it."""

    kind = "cannot plan"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are built in `dtype`: a fake module cannot be converted afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class Net:
    """One network: its library class ("diffusers.UNet2DConditionModel") and constructor config."""

    cls: str
    config: dict

    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The network with fresh weights in `dtype`, in whatever tensor mode is active (fake tensors
        in a plan). Built in its dtype, not converted: a fake module cannot swap its parameters."""
        import importlib

        library, name = self.cls.split(".")
        cls = getattr(importlib.import_module(library), name)
        with default_dtype(dtype):
            if library == "diffusers":
                return cls.from_config(self.config)
            return cls(cls.config_class.from_dict(self.config))

    def params(self) -> int:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            return sum(p.numel() for p in self.build().parameters())


@dataclass(frozen=True)
class RewardNet:
    """A reward model: its CLIP (a CLIPModel config) read as reward `name` (distar.rewards)."""

    name: str
    clip: Net
    preprocessing: tuple = ()  # (size, mean, std) from the folder's preprocessor config; default: the CLIP's own


@dataclass
class Architecture:
    family: str
    unet: Net
    vae: Net
    texts: list[Net]
    scheduler: dict
    zeros_for_empty: bool = True  # SDXL's force_zeros_for_empty_prompt
    rewards: list[RewardNet] = field(default_factory=list)


def _read(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _transformers_net(folder: Path, default: str) -> Net:
    config = _read(folder / "config.json")
    return Net(f"transformers.{(config.get('architectures') or [default])[0]}", config)


def pipeline_from_folder(folder: Path, family: str) -> Architecture:
    index = json.loads((folder / "model_index.json").read_text())
    texts = [_transformers_net(folder / "text_encoder", "CLIPTextModel")]
    if (folder / "text_encoder_2").is_dir():
        texts.append(_transformers_net(folder / "text_encoder_2", "CLIPTextModelWithProjection"))
    return Architecture(
        family, Net("diffusers.UNet2DConditionModel", _read(folder / "unet" / "config.json")),
        Net("diffusers.AutoencoderKL", _read(folder / "vae" / "config.json")), texts,
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text()), index.get("force_zeros_for_empty_prompt", True),
    )


def published_pipeline(family: str, field_name: str, source: str) -> Architecture:
    unet = "diffusers.UNet2DConditionModel"
    if family == "sd15":
        return Architecture(family, Net(unet, published.SD15_UNET), Net("diffusers.AutoencoderKL", published.SD15_VAE),
                            [Net("transformers.CLIPTextModel", published.SD15_TEXT)], dict(tiny.SD_SCHEDULE))
    if family == "sdxl":
        return Architecture(family, Net(unet, published.SDXL_UNET), Net("diffusers.AutoencoderKL", published.SDXL_VAE),
                            [Net("transformers.CLIPTextModel", published.SDXL_TEXT),
                             Net("transformers.CLIPTextModelWithProjection", published.SDXL_TEXT_2)], dict(tiny.SD_SCHEDULE))
    raise CannotPlan(f"{field_name}: {source!r} is not a folder, and family {family!r} has no published architecture here (sd15, sdxl)")


def _local(source: str, kind: str, field_name: str, read):
    """read(folder) for a source with a folder here or a tiny model built into a temporary one;
    None for a hub id or s3:// prefix. A source that cannot be had fails as the run would."""
    folder = sources.resolve(source, kind, cache_dir(), field_name, fetch=False)
    if folder is not None:
        return read(Path(folder))
    if source == sources.TINY:
        with tempfile.TemporaryDirectory() as tmp:
            return read(sources.TINY_BUILDERS[kind](Path(tmp) / kind))
    return None


def reward_from_folder(name: str, folder: Path) -> RewardNet:
    from distar.rewards.preprocess import read_preprocessing

    config = _read(folder / "config.json")
    if config.get("model_type") != "clip":
        raise CannotPlan(f"{folder}: {name} plans only a transformers CLIPModel folder, this is {config.get('model_type')!r}")
    preprocessing = read_preprocessing(folder, config.get("vision_config", {}).get("image_size", 224))
    return RewardNet(name, Net("transformers.CLIPModel", config), preprocessing)


def reward(cfg: RunConfig, i: int) -> RewardNet:
    spec, field_name = cfg.rewards[i], f"rewards.{i}.source"
    if spec.name not in ("pickscore", "clip_score", "aesthetic"):
        raise CannotPlan(f"{field_name}: {spec.name} is built by its own package (distar.rewards.{spec.name}), whose architecture ships no config here")
    net = _local(spec.source, spec.name, field_name, lambda folder: reward_from_folder(spec.name, folder))
    if net is not None:
        return net
    repo = spec.source.split("@")[0]
    if repo not in published.HUB_CLIPS or spec.name == "aesthetic":
        known = ", ".join(published.HUB_CLIPS)
        raise CannotPlan(f"{field_name}: {spec.source!r} is not a folder here, and its architecture is not one that ships ({known})")
    return RewardNet(spec.name, Net("transformers.CLIPModel", published.HUB_CLIPS[repo]))


def pipeline(cfg: RunConfig) -> Architecture:
    """The reference pipeline's networks, by config (no rewards)."""
    m = cfg.model
    arch = _local(m.reference, m.family, "model.reference", lambda folder: pipeline_from_folder(folder, m.family))
    return arch if arch is not None else published_pipeline(m.family, "model.reference", m.reference)


def architecture(cfg: RunConfig) -> Architecture:
    """Every network a run's roles hold, by config; raises a UserError for a source that cannot be
    had and CannotPlan for an architecture that is not known here."""
    arch = pipeline(cfg)
    arch.rewards = [reward(cfg, i) for i in range(len(cfg.rewards))]
    return arch
