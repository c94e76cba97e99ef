"""Validation: the generator on a fixed prompt set with noise never used in training, scored by
the run's own reward models (through the reward pool on Ray) and, in the shapes world, by the
toy reader: its pref and its alignment accuracy against the prompt. Rewards alone can be hacked;
the reader's accuracy shows when alignment pays for it. The val/* values go to MLflow and to
Tune, whose scheduler stops trials and whose sweep picks the best one by them.

With data.validation_features, rank 0 also samples the reference model on the validation prompts
once at the start (subjects.REFERENCE_STEPS DDIM steps) and compares each validation's images with
those samples on that feature network: val/ref/*, the distribution metrics that need no world
renders, so real-image runs see a generator leave the reference's distribution.
"""

from __future__ import annotations

import torch

from distar.config import RunConfig
from distar.data import HELD_OUT_SEED, validation_prompts
from distar.evaluation.features import load_features
from distar.evaluation.judges import Judges, distribution_metrics, load_reader, reader_metrics, reader_reads
from distar.evaluation.measure import AgainstReference, release_freed_memory
from distar.evaluation.subjects import reference_samples
from distar.models.diffusion import DiffusionParts, OneStepGenerator
from distar.roles.reward_worker import RewardRequest
from distar.run.record import one_step_latents
from distar.run.runtime import ScoreRewards

PREFIX = "val/"
READER = "reader"  # data.validation_features: the shapes world's reader


def metric_names(cfg: RunConfig) -> list[str]:
    """The val/* metrics a run of `cfg` reports (the reader's only in the shapes world)."""
    prompts = validation_prompts(cfg.data.prompts, cfg.data.validation_prompts, cfg.data.validation_size)
    if not prompts:
        return []
    names = [f"reward/{r.name}" for r in cfg.rewards]
    if reader_reads(prompts, cfg.model.resolution):
        names += reader_metrics(len(prompts))
    if cfg.data.validation_features:
        names += distribution_metrics("ref", len(prompts))
    return [PREFIX + name for name in names]


def unreported(cfg: RunConfig, metric: str) -> str | None:
    """Why a run of `cfg` does not report the val/* `metric` (what a sweep or guard names), or None if it does."""
    from distar.evaluation.distribution import FID_MIN

    names = metric_names(cfg)
    if not names:
        return f"{metric} needs validation, which the run config turns off (data.validation_size is 0)"
    if metric in names:
        return None
    if metric.endswith("/fid") and metric.replace("/fid", "/precision") in names:  # distribution metrics, too few images
        return f"{metric} needs at least {FID_MIN} validation images; data.validation_size is {cfg.data.validation_size}"
    return f"{metric} is not reported by this run config (it reports {', '.join(names)})"


class Validation:
    """`validation(generator)` runs the generator on every rank (ZeRO-3 forwards are collective)
    and returns the val/* values where it can score (`score_rewards` given: rank 0), else {}."""

    def __init__(self, cfg: RunConfig, parts: DiffusionParts, latent_shape: tuple[int, int, int], score_rewards: ScoreRewards | None):
        self.prompts = validation_prompts(cfg.data.prompts, cfg.data.validation_prompts, cfg.data.validation_size)
        self.every, self.last, self.chunk = cfg.run.validate_every, cfg.run.steps, cfg.data.batch_size  # a chunk fits the pools' batches
        self.parts, self.latent_shape, self.score_rewards = parts, latent_shape, score_rewards
        self.reader = Judges(reader=load_reader(self.prompts)) if score_rewards is not None else None
        device = str(next(parts.vae.parameters()).device)  # the reference samples where the run decodes
        self.versus = against_reference(cfg, self.prompts, device) if score_rewards is not None and cfg.data.validation_features else None

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def due(self, step: int) -> bool:
        """After update `step`: every run.validate_every updates and after the last (the runs also validate before the first)."""
        return self.enabled and (step % self.every == 0 or step == self.last)

    def __call__(self, generator: OneStepGenerator) -> dict[str, float]:
        x0 = one_step_latents(generator, self.parts.conditioner, self.latent_shape, self.prompts, HELD_OUT_SEED, self.chunk)
        if self.score_rewards is None:
            return {}
        pending = [self.score_rewards(RewardRequest(x0[i : i + self.chunk].detach(), self.prompts[i : i + self.chunk]))
                   for i in range(0, len(x0), self.chunk)]  # all in flight at once
        results = [p.result().rewards for p in pending]
        values = {f"{PREFIX}reward/{name}": float(torch.cat([r[name] for r in results]).float().mean()) for name in results[0]}
        with torch.no_grad():
            images = self.parts.decode(x0).cpu()
        values.update({f"{PREFIX}{k}": v for k, v in self.reader.score(images, self.prompts).items()})
        if self.versus is not None:
            values.update({f"{PREFIX}{k}": v for k, v in self.versus.against(images).items()})
        return values


def against_reference(cfg: RunConfig, prompts: list[str], device: str) -> AgainstReference:
    """data.validation_features' comparison, holding the features of the reference's samples of `prompts`."""
    versus = AgainstReference(feature_network(cfg.data.validation_features, prompts, device))
    versus.remember(reference_samples(cfg, prompts, device))
    release_freed_memory()  # the reference pipeline is gone; only its samples' features stay
    return versus


def feature_network(source: str, prompts: list[str], device: str):
    """data.validation_features as a callable: images [N, 3, H, W] in [0, 1] -> features [N, D]."""
    if source == READER:
        return load_reader(prompts).features
    return load_features(source, device, field="data.validation_features")
