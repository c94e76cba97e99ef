"""All roles in one process: the single-process baseline and the engine of tests and smoke runs.

Builds the reference, generator, fake score and reward models from the config's sources,
wires a RewardWorker and a ReferencePool into a TrainerStep by direct calls, and trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from distar.config import RunConfig, to_yaml
from distar.data import PromptSampler, load_prompts
from distar.images import grid, save_png
from distar.models.diffusion import DiffusionParts, export_generator
from distar.roles import from_config, outputs
from distar.roles.trainer import Ready, TrainerStep
from distar.roles.validation import Validation
from distar.tracking.runs import RunTarget


@dataclass
class InProcessRun:
    cfg: RunConfig
    parts: DiffusionParts
    trainer: TrainerStep
    sampler: PromptSampler


def build(cfg: RunConfig) -> InProcessRun:
    parts = from_config.reference_parts(cfg)
    generator, fake = from_config.trainable_networks(cfg, parts)
    reference, worker = from_config.reference_pool(parts), from_config.reward_worker(cfg)
    trainer = TrainerStep(
        generator, fake, parts.conditioner, parts.latent_shape(cfg.model.resolution), cfg.objective, cfg.rewards, cfg.optim,
        score_rewards=lambda x0, prompts: Ready(worker(x0, prompts)), query_reference=reference,
    )
    sampler = PromptSampler(load_prompts(cfg.data.prompts), cfg.data.batch_size, cfg.run.seed)
    return InProcessRun(cfg, parts, trainer, sampler)


def train(cfg: RunConfig, tracking: RunTarget | None = None, log: Callable[[str], None] = print) -> Path:
    """Run cfg.run.steps updates in this process; export the generator and a before/after grid
    (top row: the generator at initialisation, bottom row: trained, same prompts and noise).
    With a tracking target, metrics and grids go to that MLflow run."""
    run = build(cfg)  # every source resolves before anything is written
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    shown = outputs.grid_prompts(run.sampler.prompts)
    sample = lambda: outputs.sample_images(run.trainer.generator, run.parts, run.trainer.latent_shape, shown, cfg.run.seed)  # noqa: E731
    steps = cfg.run.steps
    record = outputs.RunRecord(tracking, shown, sample, cfg.tracking.grid_every, steps)
    validation = Validation(cfg, run.parts, run.trainer.latent_shape, run.trainer.score_rewards)
    before = record.grid(0)
    if validation.enabled:
        record.validated(0, validation(run.trainer.generator))
    rng = torch.Generator().manual_seed(cfg.run.seed)
    line = outputs.StepLine(0, steps)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        metrics = run.trainer.step(run.sampler.batch(step - 1), rng)
        record.step(step, metrics, time.perf_counter() - start, cfg.data.batch_size)
        if step % cfg.run.log_every == 0 or step == steps:
            log(line(step, metrics))
        if validation.due(step):
            values = validation(run.trainer.generator)
            record.validated(step, values)
            log(outputs.validation_line(step, values))
    save_png(grid(torch.cat([before, record.grid(steps)]), columns=len(shown)), out / "before_after.png", scale=4)
    record.close()
    folder = export_generator(run.trainer.generator, run.parts.folder, out / "generator")
    log(f"generator written to {folder} (diffusers folder; sample with timesteps=[{cfg.model.t_star}])")
    return folder
