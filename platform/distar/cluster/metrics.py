"""The run's metrics as Ray metrics: exported by every node's agent to Prometheus (and Grafana).

Names start with `distar_`; Ray prefixes them with `ray_`. Every series carries the run's name,
so runs sharing a cluster (and Tune trials sharing pools) stay apart. dashboards/run.json plots them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ray.util import metrics

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# What a step's wall time is spent on. The first four are timed around the callables TrainerStep
# is given (see StepParts); "forward" is the rest: the trainer's own forward passes (generator,
# fake score, text encoder), the noise draws and the ranks' skip agreement.
STEP_PARTS = ("reward", "reference", "fake_score_update", "generator_update", "forward")


class RoleMetrics:
    """Pool side: how large the batches a replica assembles from concurrent requests are."""

    def __init__(self, role: str):
        self.tags = {"role": role}
        self.batch = metrics.Histogram("distar_pool_batch_size", "Images per batch a pool replica ran.", BATCH_BOUNDS, tag_keys=("role",))

    def batch_ran(self, images: int) -> None:
        self.batch.observe(images, tags=self.tags)


class _Waited:
    """A pending result whose result() is timed (the part of a call the trainer waits for)."""

    def __init__(self, result: Callable[[], Any]):
        self.result = result


class StepParts:
    """Seconds of the current step spent in each part, added up by the callables it wraps.

    The trainer step (roles/trainer.py) stays free of timing code: the train loop hands it wrapped
    pool calls and optimiser updates instead. Parts are timed where the trainer waits for them, so
    a reward call that overlaps the fake score's forward costs only what is left of it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def timed(self, part: str, call: Callable) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return run

    def waited(self, part: str, call: Callable) -> Callable:
        """For a call that returns a pending result at once: time the wait in its result()."""
        return lambda *args, **kwargs: _Waited(self.timed(part, call(*args, **kwargs).result))

    def take(self) -> dict[str, float]:
        """The step's seconds per part so far, and start the next step from zero."""
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


class TrainerMetrics:
    """Trainer side: step time (and its parts), throughput, per-role request latency, the objective's terms."""

    def __init__(self, run: str):
        self.tags = {"run": run}
        self.step_time = metrics.Histogram("distar_step_time_s", "Wall time of one generator update (with its K fake-score updates).",
                                           LATENCY_BOUNDS, tag_keys=("run",))
        # Seconds spent in each part, summed over the steps: a counter, not a histogram, because Ray
        # exports a histogram's _sum approximated from its bucket midpoints, and per-part histograms
        # would then not add up to the step time. Divided by the step count, these do, exactly.
        self.step_part = metrics.Counter("distar_step_part_s", f"Seconds of the steps spent in each part ({', '.join(STEP_PARTS)}).",
                                         tag_keys=("run", "part"))
        self.samples = metrics.Gauge("distar_samples_per_s", "Generated samples per second over all trainer ranks.", tag_keys=("run",))
        self.latency = metrics.Histogram("distar_role_latency_s", "Round trip of one request to a pool, seen by the trainer.",
                                         LATENCY_BOUNDS, tag_keys=("run", "role"))
        self.reward = metrics.Gauge("distar_reward", "Batch mean of each reward model's score.", tag_keys=("run", "model"))
        self.loss = metrics.Gauge("distar_loss", "divergence, fake_score and generator loss terms.", tag_keys=("run", "term"))
        # A gauge of the run's total, not a counter: Ray's Counter refuses inc(0), so a counter would
        # have no series (no data, not 0) until the first skip; the total also survives resumes.
        self.skipped = metrics.Gauge("distar_skipped_steps", "Updates skipped so far in the run because a loss or reward was not finite.",
                                     tag_keys=("run",))

    def request_done(self, role: str, seconds: float) -> None:
        self.latency.observe(seconds, tags={**self.tags, "role": role})

    def step_done(self, seconds: float, samples: int, values: dict[str, float], parts: dict[str, float], skipped_total: int) -> None:
        """parts: StepParts.take() of this step; what they leave of `seconds` is counted as "forward"."""
        self.step_time.observe(seconds, tags=self.tags)
        for part in STEP_PARTS:
            spent = max(seconds - sum(parts.values()), 0.0) if part == "forward" else parts.get(part, 0.0)
            if spent > 0:  # Ray's Counter takes positive increments only (with objective.alpha = 0 there is no reference call)
                self.step_part.inc(spent, tags={**self.tags, "part": part})
        self.samples.set(samples / seconds, tags=self.tags)
        for key, value in values.items():
            kind, _, name = key.partition("/")
            if kind == "reward":
                self.reward.set(value, tags={**self.tags, "model": name})
        for term, key in (("divergence", "divergence"), ("fake_score", "loss/fake_score"), ("generator", "loss/generator")):
            if key in values:
                self.loss.set(values[key], tags={**self.tags, "term": term})
        self.skipped.set(skipped_total, tags=self.tags)
