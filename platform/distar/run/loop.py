"""The one run loop: what a training run does, in whatever runtime it runs (distar.run.runtime).

    set up   the reference's parts, the generator and the fake score, the pools, the trainer step
    start    resume from the latest checkpoint, or grid and validate the untrained generator
    step     K fake-score updates and one generator update; its record and step line; validation,
             reports and checkpoints at their cadence; the stop rule
    guard    with run.guard on, held-out judges watched at each validation (distar.run.guard): the
             kept generator snapshotted, rolled back to, and in the end the one exported
    end      the before/after grid and the exported generator, or why the run stopped

Rank r of W trains on rows [r*B, (r+1)*B) of a global batch of W*B prompts. All ranks draw the
global batch's noise from one generator seeded alike, so the update is the same whatever W is.
Every rank makes the same network calls (ZeRO-3 forwards and backwards are collective); rank 0
writes the records, the metrics file and the export.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distar.config import RunConfig, to_yaml
from distar.data import PromptSampler, load_prompts
from distar.images import grid, save_png
from distar.models.diffusion import export_generator
from distar.roles.trainer import Shard, TrainerStep
from distar.run import build
from distar.run.guard import Guard
from distar.run.record import RunRecord, StepLine, grid_prompts, sample_images, validation_line
from distar.run.runtime import Outcome, Progress, Runtime
from distar.run.timing import StepParts
from distar.run.validation import Validation
from distar.tracking.runs import RunTarget

METRICS_FILE = "metrics.jsonl"  # rank 0's values of every step, appended as they come


class RunLoop:
    """`RunLoop(cfg, runtime).run(tracking)`: set up on construction (every source loaded, the
    trainer step wired to the runtime's pools and updates), trained by run()."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, log: Callable[[str], None] = print):
        self.cfg, self.runtime, self.log = cfg, runtime, log
        self.parts = build.reference_parts(cfg, runtime.device, trainer=True)
        generator, fake = build.trainable_networks(cfg, self.parts)
        self.score_rewards, query_reference = runtime.pools(cfg, self.parts)
        self.latent_shape = self.parts.latent_shape(cfg.model.resolution)
        self.parts.unet = None  # the trainer needs the reference UNet only to initialise its networks
        self.timing = timing = StepParts()  # the step's time by part: its calls, updates and forwards, timed
        gen_update, fake_update = runtime.updates(generator, fake, timing)
        for part, module in (("generator_forward", generator.unet), ("fake_forward", fake.unet), ("text_encoder", self.parts.conditioner)):
            timing.hook(part, module)
        self.trainer = TrainerStep(
            generator, fake, self.parts.conditioner, self.latent_shape, cfg.objective, cfg.rewards, cfg.optim,
            score_rewards=timing.waited("reward", self.score_rewards), query_reference=timing.waited("reference", query_reference),
            updates=(timing.timed("generator_update", gen_update), timing.timed("fake_score_update", fake_update)),
            shard=Shard(runtime.rank, runtime.world), all_ranks_agree=runtime.all_ranks_agree,
        )
        prompts = load_prompts(cfg.data.prompts)
        self.sampler = PromptSampler(prompts, cfg.data.batch_size * runtime.world, cfg.run.seed)
        self.shown = grid_prompts(prompts)
        self.out = Path(cfg.run.output_dir)
        self.writer = runtime.rank == 0
        self.guard: Guard | None = None
        self.at_kept = False  # the networks are the guard's kept ones (just snapshotted or rewound)

    @property
    def generator(self):
        return self.trainer.generator

    def averaged(self):
        """A context in which the generator holds its EMA weights (optim.ema_decay; every rank enters),
        as for everything a run shows and exports of it: grids, validations, the export."""
        return self.runtime.ema.applied() if self.runtime.ema else contextlib.nullcontext()

    def sample(self) -> torch.Tensor:
        """The generator's images of the grid's fixed prompts and noise (every rank takes part)."""
        with self.averaged():
            return sample_images(self.generator, self.parts, self.latent_shape, self.shown, self.cfg.run.seed)

    def validate(self, validation: Validation) -> dict[str, float]:
        with self.averaged():
            return validation(self.generator)

    def run(self, tracking: RunTarget | None = None) -> Outcome:
        """Train up to run.steps updates; with a tracking target, rank 0 records into that MLflow run."""
        cfg = self.cfg
        rng = torch.Generator().manual_seed(cfg.run.seed)
        progress = self.runtime.restore()
        if progress is not None:
            rng.set_state(torch.tensor(progress.rng, dtype=torch.uint8))
        if cfg.run.guard.enabled:
            self.guard = Guard(cfg.run.guard, cfg.rewards, progress.guard if progress is not None else None)
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            if progress is None:  # a run from step 0: no earlier run's steps in its file
                (self.out / METRICS_FILE).unlink(missing_ok=True)
        record = RunRecord(tracking if self.writer else None, self.shown, self.sample, cfg.tracking.grid_every, cfg.run.steps)
        validation = Validation(cfg, self.parts, self.latent_shape, self.score_rewards if self.writer else None)
        try:
            if progress is None:  # the starting point, and val/* in every report Tune sees from now on
                progress, before = Progress(), record.grid(0)
                if validation.enabled:
                    progress.validation = self.validate(validation)
                    record.validated(0, progress.validation)
                    self.watch(progress, record)
            else:  # the first attempt recorded the start; no before/after grid
                before = None
                if self.writer:
                    self.log(f"resuming from the checkpoint at step {progress.step}")
            self.recorded = self.last_recorded_step()
            stopped = self.steps(progress, rng, record, validation)
            after = record.grid(progress.step) if stopped is None else None
        finally:
            record.close()
        if stopped is not None:
            return Outcome(progress.step, stopped=stopped)
        return Outcome(progress.step, generator=self.export(before, after), guard=self.guard_note())

    def steps(self, progress: Progress, rng: torch.Generator, record: RunRecord, validation: Validation) -> str | None:
        """Train until run.steps; returns why the run stopped early, or None."""
        cfg, runtime, steps = self.cfg, self.runtime, self.cfg.run.steps
        line, samples = StepLine(progress.step, steps), cfg.data.batch_size * runtime.world
        self.timing.take()  # parts count from the first step on, not from set-up
        while progress.step < steps:
            start = time.perf_counter()
            values = self.trainer.step(self.sampler.batch(progress.step), rng)
            seconds = time.perf_counter() - start
            self.at_kept, guarded = False, False
            with self.timing.part("loop"):
                parts = self.timing.take()  # this step's parts and the previous step's loop work: the time between two steps
                skipped = bool(values["skipped"])
                progress.step, progress.applied = progress.step + 1, progress.applied + (not skipped)
                progress.skipped_in_a_row = progress.skipped_in_a_row + 1 if skipped else 0
                if self.writer:  # one series per run: the values are the same on every rank, or rank 0's shard
                    runtime.step_done(seconds, samples, values, parts, progress.step - progress.applied)
                    if progress.step % cfg.run.log_every == 0 or progress.step == steps:
                        self.log(line(progress.step, values))
                # Steps replayed from a checkpoint were recorded by the attempt that died (the same values:
                # the run is deterministic); each step is recorded once.
                fresh = progress.step > self.recorded
                if fresh:
                    record.step(progress.step, values, seconds, samples)
                if validation.due(progress.step):
                    progress.validation, progress.validations = self.validate(validation), progress.validations + 1
                    if fresh:
                        record.validated(progress.step, progress.validation)
                    if self.writer:
                        self.log(validation_line(progress.step, progress.validation))
                    guarded = self.watch(progress, record)
                stopped = self.stop_rule(progress)
                self.keep(progress, rng, {**values, "step": progress.step, "applied": progress.applied}, parts, validation,
                          stopping=stopped is not None or guarded)
            if stopped is not None or guarded:
                return stopped
        return None

    def watch(self, progress: Progress, record: RunRecord) -> bool:
        """The guard's turn after a validation; True when it stops the run. Rank 0 judges, and every
        rank keeps or loads the networks (collectives) on rank 0's word. At the end, at a stop and
        after a rollback the networks are the kept ones, and so are the reported val/* values."""
        if self.guard is None:
            return False
        verdict = self.guard.observe(progress.step, progress.validation) if self.writer else None
        told = lambda bit: self.runtime.all_ranks_agree(True if verdict is None else bit)  # noqa: E731  (rank 0's bit on every rank)
        if told(verdict and verdict.keep):
            self.runtime.snapshot()
            self.at_kept = True
        rollback, stop = told(verdict and verdict.action == "rollback"), told(verdict and verdict.action == "stop")
        if verdict is not None and verdict.reason:
            self.log(f"guard: {verdict.reason}")
        if rollback or ((stop or progress.step == self.cfg.run.steps) and not self.at_kept):
            self.runtime.rewind()
            self.at_kept = True
        if self.writer:
            if self.at_kept:
                progress.validation = dict(self.guard.state.kept_values)
            progress.guard = self.guard.saved()
            record.note("distar.guard", self.guard_note())
        return stop

    def guard_note(self) -> str | None:
        """Which generator the guard kept, and each time it tripped (rank 0's)."""
        if self.guard is None or not self.writer:
            return None
        s = self.guard.state
        return "\n".join([f"kept the generator of step {s.kept_step} (training reward {s.kept_reward:.4g})", *s.trips])

    def last_recorded_step(self) -> int:
        """The last step in the metrics file (rank 0's; other ranks record nothing), which is cut
        back to its complete lines: a killed worker may have left half of one."""
        path = self.out / METRICS_FILE
        if not self.writer or not path.is_file():
            return 0
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]
        if complete != text:
            path.write_text(complete)
        lines = complete.splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    def stop_rule(self, progress: Progress) -> str | None:
        """Too many updates in a row skipped: the run cannot go on (restarting its workers would
        only bring back the same non-finite state)."""
        limit = self.cfg.run.max_consecutive_skips
        if progress.skipped_in_a_row < limit:
            return None
        location = (self.cfg.run.storage_path or self.cfg.run.output_dir).rstrip("/")
        return (f"{limit} updates in a row had a non-finite loss, reward or gradient (run.max_consecutive_skips); no checkpoint "
                f"was written at the stop, so the last one under {location}/checkpoints holds the state before it")

    def keep(self, progress: Progress, rng: torch.Generator, values: dict, parts: dict, validation: Validation, stopping: bool) -> None:
        """The step's values and its time by part (`time/*` wall, `cpu/*` CPU seconds) to the metrics file; a checkpoint at its cadence and at the end, else a
        report where one is due (or at a stop, which checkpoints nothing: restarting from a
        diverged state would only stop again, evicting the good checkpoints one by one). Every
        rank reports at the same steps (a barrier)."""
        run, step = self.cfg.run, progress.step
        if self.writer and step > self.recorded:
            timed = {f"{kind}/{part}": s for kind, by_part in parts.items() for part, s in by_part.items()}
            with (self.out / METRICS_FILE).open("a") as f:
                f.write(json.dumps({**values, **timed}) + "\n")
        report = {**values, **progress.validation, "validations": progress.validations}
        if not stopping and (step % run.checkpoint_every == 0 or step == run.steps):
            progress.rng = rng.get_state().tolist()
            self.runtime.save(progress, report)
        elif stopping or step % run.log_every == 0 or validation.due(step):
            self.runtime.report(report)

    def export(self, before: torch.Tensor | None, after: torch.Tensor) -> Path:
        """The before/after grid (top row: untrained, bottom row: trained; same prompts and noise)
        and the generator as a diffusers folder, gathered on every rank, written by rank 0."""
        folder = self.out / "generator"
        with self.averaged(), self.runtime.gathered(self.generator):
            if self.writer:
                if before is not None:
                    save_png(grid(torch.cat([before, after]), columns=len(self.shown)), self.out / "before_after.png", scale=4)
                export_generator(self.generator, self.parts.folder, folder)
                self.log(f"generator written to {folder} (diffusers folder; sample with timesteps=[{self.cfg.model.t_star}])")
        return folder
