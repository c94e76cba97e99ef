"""Every piece of a run built from its RunConfig, the same way in one process, in a Ray Train
worker and in a pool replica.

Sources resolve first (a missing model fails before anything loads); every role loads only what
it holds: reward workers the VAE and reward models, reference workers the reference UNet and
text encoder(s), the trainer the generator, the fake score and the text encoder(s).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from distar.config import ConfigError, RunConfig
from distar.data import load_prompts, validation_prompts
from distar.errors import UserError
from distar.models import sources
from distar.models.diffusion import Denoiser, DiffusionParts, OneStepGenerator, decode_latents, load_parts, load_vae
from distar.rewards import load_reward
from distar.roles.reference_worker import ReferenceWorker
from distar.roles.reward_worker import RewardWorker
from distar.storage import cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_inputs(cfg: RunConfig) -> None:
    """Fail with a ConfigError on a prompt or model source of the config that cannot work, before
    anything starts (no model is downloaded; an s3:// model is checked to exist and to be readable)."""
    try:
        validation_prompts(cfg.data.prompts, cfg.data.validation_prompts, cfg.data.validation_size)
        load_prompts(cfg.data.prompts)
        m = cfg.model
        sources.resolve(m.reference, m.family, cache_dir(), "model.reference", fetch=False)
        if m.generator_init is not None:
            sources.resolve(m.generator_init, m.family, cache_dir(), "model.generator_init", fetch=False)
        check_rewards(cfg)
    except ConfigError:
        raise
    except UserError as e:  # a value of the config names what cannot be read
        raise ConfigError(e.message) from None


def check_rewards(cfg: RunConfig) -> None:
    """Every reward source can be had (as check_inputs checks them; for jobs that only score)."""
    for i, r in enumerate(cfg.rewards):
        sources.resolve(r.source, r.name, cache_dir(), f"rewards.{i}.source", fetch=False)


def dtype_of(cfg: RunConfig) -> torch.dtype:
    return DTYPES[cfg.model.dtype]


def reference_folder(cfg: RunConfig) -> Path:
    return sources.resolve(cfg.model.reference, cfg.model.family, cache_dir(), "model.reference")


def reference_parts(cfg: RunConfig, device: torch.device | str = "cpu") -> DiffusionParts:
    m = cfg.model
    return load_parts(reference_folder(cfg), m.num_train_timesteps, dtype_of(cfg), m.family, m.resolution).to(device)


def reward_models(cfg: RunConfig, device: torch.device | str = "cpu") -> dict:
    """The config's reward models by name, frozen, on `device`."""
    return {r.name: load_reward(r.name, sources.resolve(r.source, r.name, cache_dir(), f"rewards.{i}.source")).to(device).eval()
            for i, r in enumerate(cfg.rewards)}


def reward_worker(cfg: RunConfig, device: torch.device | str = "cpu") -> RewardWorker:
    vae = load_vae(reference_folder(cfg), dtype_of(cfg)).to(device)
    return RewardWorker(functools.partial(decode_latents, vae), reward_models(cfg, device))


def reference_worker(parts: DiffusionParts) -> ReferenceWorker:
    return ReferenceWorker(Denoiser(parts.unet, parts.schedule), parts.conditioner)


def trainable_networks(cfg: RunConfig, parts: DiffusionParts) -> tuple[OneStepGenerator, Denoiser]:
    """The generator (from generator_init, else a copy of the reference UNet) and the fake score
    (a copy of the reference UNet). Seeded: every trainer rank builds the same networks."""
    torch.manual_seed(cfg.run.seed)
    gen_unet = copy.deepcopy(parts.unet)
    if cfg.model.generator_init is not None:
        from diffusers import UNet2DConditionModel

        init = sources.resolve(cfg.model.generator_init, cfg.model.family, cache_dir(), "model.generator_init")
        gen_unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet" if (init / "unet").is_dir() else None, torch_dtype=dtype_of(cfg))
    generator = OneStepGenerator(gen_unet.requires_grad_(True), parts.schedule, cfg.model.t_star)
    fake = Denoiser(copy.deepcopy(parts.unet).requires_grad_(True), parts.schedule)
    return generator, fake
