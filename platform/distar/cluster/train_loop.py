"""What every Ray Train worker runs: the generator and the fake score as DeepSpeed engines,
TrainerStep on this rank's shard of the global batch, the pools called through Serve handles.

Rank r of W trains on rows [r*B, (r+1)*B) of a global batch of W*B prompts. All ranks draw the
global batch's noise from one generator seeded alike, so the update is the in-process runner's
on the same W*B prompts, whatever W is. Checkpoints hold both engines (ZeRO shards with their
Adam states), the step, counters and the RNG state; a resumed run continues identically.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from distar.cluster.calls import PoolClients
from distar.cluster.engines import EngineUpdate, all_ranks_agree, engine_for, gathered
from distar.cluster.metrics import StepParts, TrainerMetrics
from distar.config import RunConfig
from distar.data import PromptSampler, load_prompts
from distar.images import grid, save_png
from distar.models.diffusion import export_generator
from distar.roles import from_config, outputs
from distar.roles.trainer import Shard, TrainerStep
from distar.roles.validation import Validation

STATE_FILE = "trainer_state.json"


@dataclass
class Progress:
    """What, besides the engines, a checkpoint must hold to continue identically."""

    step: int = 0  # generator updates done (the next batch is sampler.batch(step))
    applied: int = 0  # of which applied; the rest were skipped
    skipped_in_a_row: int = 0
    rng: list[int] | None = None  # the noise generator's state
    validations: int = 0  # validations since training began: Tune's scheduler counts time in them
    validation: dict[str, float] = field(default_factory=dict)  # the latest val/* values, in every report


def train_loop(config: dict) -> None:
    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(cfg.run.output_dir)

    parts = from_config.reference_parts(cfg, ray.train.torch.get_device())
    generator, fake = from_config.trainable_networks(cfg, parts)
    latent_shape = parts.latent_shape(cfg.model.resolution)
    parts.unet = None  # the trainer needs the reference only as the networks' initialisation
    gen_engine, fake_engine = engine_for(generator, cfg, cfg.optim.generator), engine_for(fake, cfg, cfg.optim.fake_score)
    metrics = TrainerMetrics(cfg.run.name)
    clients = PoolClients(config["reward"], config["reference"], metrics.request_done)
    timing = StepParts()  # step time by part (metrics' distar_step_part_s): the trainer's calls, timed
    trainer = TrainerStep(
        generator, fake, parts.conditioner, latent_shape, cfg.objective, cfg.rewards, cfg.optim,
        score_rewards=timing.waited("reward", clients.score_rewards), query_reference=timing.timed("reference", clients.query_reference),
        updates=(timing.timed("generator_update", EngineUpdate(gen_engine)), timing.timed("fake_score_update", EngineUpdate(fake_engine))),
        shard=Shard(rank, world), all_ranks_agree=all_ranks_agree,
    )
    prompts = load_prompts(cfg.data.prompts)
    sampler = PromptSampler(prompts, cfg.data.batch_size * world, cfg.run.seed)
    rng = torch.Generator().manual_seed(cfg.run.seed)
    progress = _resume(gen_engine, fake_engine, rng)
    if rank == 0 and progress.step:
        print(f"resuming from the checkpoint at step {progress.step}", flush=True)

    shown = outputs.grid_prompts(prompts)
    sample = lambda: outputs.sample_images(generator, parts, latent_shape, shown, cfg.run.seed)  # noqa: E731
    steps = cfg.run.steps
    record = outputs.RunRecord(config["tracking"] if rank == 0 else None, shown, sample, cfg.tracking.grid_every, steps)
    validation = Validation(cfg, parts, latent_shape, clients.score_rewards if rank == 0 else None)
    try:
        before = record.grid(0) if progress.step == 0 else None
        if progress.step == 0 and validation.enabled:  # the starting point, and val/* in every report Tune sees
            progress.validation = validation(generator)
            record.validated(0, progress.validation)
        line = outputs.StepLine(progress.step, steps)
        while progress.step < steps:
            start = time.perf_counter()
            values = trainer.step(sampler.batch(progress.step), rng)
            progress.step += 1
            seconds, samples, step_parts = time.perf_counter() - start, cfg.data.batch_size * world, timing.take()
            skipped = bool(values["skipped"])
            progress.applied += not skipped
            progress.skipped_in_a_row = progress.skipped_in_a_row + 1 if skipped else 0
            if rank == 0:  # one series per run: the values are the same on every rank, or rank 0's shard
                metrics.step_done(seconds, samples, values, step_parts, progress.step - progress.applied)
                if progress.step % cfg.run.log_every == 0 or progress.step == steps:
                    print(line(progress.step, values), flush=True)
            record.step(progress.step, values, seconds, samples)
            if validation.due(progress.step):
                progress.validation, progress.validations = validation(generator), progress.validations + 1
                record.validated(progress.step, progress.validation)
                if rank == 0:
                    print(outputs.validation_line(progress.step, progress.validation), flush=True)
            stop = progress.skipped_in_a_row >= cfg.run.max_consecutive_skips
            # `stopped` reaches the driver, which fails the run with a clear message (raising here
            # would count as a worker failure and restart the workers into the same non-finite state).
            values.update(step=progress.step, applied=progress.applied, stopped=float(stop))
            if rank == 0:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(values) + "\n")
            # Only rank 0's report reaches the driver and Tune; every rank reports at the same steps (a barrier).
            report = {**values, **progress.validation, "validations": progress.validations}
            if stop or progress.step % cfg.run.checkpoint_every == 0 or progress.step == steps:
                _save(gen_engine, fake_engine, progress, rng, report)
            elif progress.step % cfg.run.log_every == 0 or validation.due(progress.step):
                ray.train.report(report)
            if stop:
                return
        after = record.grid(steps)
    finally:
        record.close()

    with gathered(generator):  # every rank takes part; rank 0 writes the full weights
        if rank == 0:
            if before is not None:
                save_png(grid(torch.cat([before, after]), columns=len(shown)), out / "before_after.png", scale=4)
            folder = export_generator(generator, parts.folder, out / "generator")
            print(f"generator written to {folder} (diffusers folder; sample with timesteps=[{cfg.model.t_star}])", flush=True)


def _save(gen_engine, fake_engine, progress: Progress, rng: torch.Generator, values: dict) -> None:
    with tempfile.TemporaryDirectory() as d:  # one per rank; Ray merges them into one checkpoint
        gen_engine.save_checkpoint(d, tag="generator")
        fake_engine.save_checkpoint(d, tag="fake_score")
        if ray.train.get_context().get_world_rank() == 0:
            state = Progress(progress.step, progress.applied, progress.skipped_in_a_row, rng.get_state().tolist(), progress.validations, progress.validation)
            (Path(d) / STATE_FILE).write_text(json.dumps(asdict(state)))
        ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(d))


def _resume(gen_engine, fake_engine, rng: torch.Generator) -> Progress:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as d:
        gen_engine.load_checkpoint(d, tag="generator")
        fake_engine.load_checkpoint(d, tag="fake_score")
        progress = Progress(**json.loads((Path(d) / STATE_FILE).read_text()))
    rng.set_state(torch.tensor(progress.rng, dtype=torch.uint8))
    return progress
