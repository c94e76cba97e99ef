"""All roles in one process: the single-process baseline and the engine of tests and smoke runs.

Builds the reference, generator, fake score and reward models from the config's sources,
wires a RewardWorker and a ReferencePool into a TrainerStep by direct calls, and trains.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distar.config import RunConfig, to_yaml
from distar.data import PromptSampler, load_prompts
from distar.images import grid, save_png
from distar.models import sources
from distar.models.diffusion import Denoiser, DiffusionParts, OneStepGenerator, export_generator, load_parts
from distar.rewards import load_reward
from distar.roles.reference_pool import ReferencePool
from distar.roles.reward_worker import RewardWorker
from distar.roles.trainer import TrainerStep

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where built-in sources (`tiny-random`) are materialised once per machine."""
    return Path(os.environ.get("DISTAR_CACHE", Path.home() / ".cache" / "distar"))


@dataclass
class InProcessRun:
    cfg: RunConfig
    parts: DiffusionParts
    trainer: TrainerStep
    sampler: PromptSampler


def build(cfg: RunConfig) -> InProcessRun:
    dtype = DTYPES[cfg.model.dtype]
    torch.manual_seed(cfg.run.seed)
    ref_folder = sources.resolve(cfg.model.reference, cfg.model.family, cache_dir(), "model.reference")
    parts = load_parts(ref_folder, cfg.model.num_train_timesteps, dtype, cfg.model.family, cfg.model.resolution)
    gen_unet = copy.deepcopy(parts.unet)
    if cfg.model.generator_init is not None:
        from diffusers import UNet2DConditionModel

        init = sources.resolve(cfg.model.generator_init, cfg.model.family, cache_dir(), "model.generator_init")
        gen_unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet" if (init / "unet").is_dir() else None, torch_dtype=dtype)
    generator = OneStepGenerator(gen_unet, parts.schedule, cfg.model.t_star)
    fake = Denoiser(copy.deepcopy(parts.unet), parts.schedule)
    reference = ReferencePool(Denoiser(parts.unet, parts.schedule), parts.conditioner)
    reward_models = {
        r.name: load_reward(r.name, sources.resolve(r.source, r.name, cache_dir(), f"rewards.{i}.source"))
        for i, r in enumerate(cfg.rewards)
    }
    worker = RewardWorker(parts.decode, reward_models)
    trainer = TrainerStep(
        generator, fake, parts.conditioner, parts.latent_shape(cfg.model.resolution),
        cfg.objective, cfg.rewards, cfg.optim, score_rewards=worker, query_reference=reference,
    )
    sampler = PromptSampler(load_prompts(cfg.data.prompts), cfg.data.batch_size, cfg.run.seed)
    return InProcessRun(cfg, parts, trainer, sampler)


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


GRID_SIZE = 8  # prompts (columns) in the before/after grid


@torch.no_grad()
def sample_images(run: InProcessRun, prompts: list[str], seed: int) -> torch.Tensor:
    """The generator's images for fixed prompts and noise, decoded to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), *run.trainer.latent_shape, generator=g)
    return run.parts.decode(run.trainer.generator(z, run.parts.conditioner(prompts)))


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """Run cfg.run.steps updates in this process; export the generator and a before/after grid
    (top row: the generator at initialisation, bottom row: trained, same prompts and noise)."""
    run = build(cfg)  # every source resolves before anything is written
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    prompts = run.sampler.prompts
    grid_prompts = [prompts[i * len(prompts) // GRID_SIZE] for i in range(min(GRID_SIZE, len(prompts)))]
    before = sample_images(run, grid_prompts, cfg.run.seed)
    rng = torch.Generator().manual_seed(cfg.run.seed)
    start, steps = time.perf_counter(), cfg.run.steps
    for step in range(steps):
        metrics = run.trainer.step(run.sampler.batch(step), rng)
        done = step + 1
        if done % cfg.run.log_every == 0 or done == steps:
            rate = done / (time.perf_counter() - start)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log(f"step {done}/{steps} | {shown} | {rate:.2f} step/s | ETA {_eta((steps - done) / rate)}")
    after = sample_images(run, grid_prompts, cfg.run.seed)
    save_png(grid(torch.cat([before, after]), columns=len(grid_prompts)), out / "before_after.png", scale=4)
    folder = export_generator(run.trainer.generator, run.parts.folder, out / "generator")
    log(f"generator written to {folder} (diffusers folder; sample with timesteps=[{cfg.model.t_star}])")
    return folder
