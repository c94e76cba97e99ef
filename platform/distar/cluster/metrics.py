"""The run's metrics as Ray metrics: exported by every node's agent to Prometheus (and Grafana).

Names start with `distar_`; Ray prefixes them with `ray_`. Every series carries the run's name,
so runs sharing a cluster (and Tune trials sharing pools) stay apart. dashboards/run.json plots them.
"""

from __future__ import annotations

from ray.util import metrics

from distar.run.timing import STEP_PARTS

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class RoleMetrics:
    """Pool side: how large the batches a replica assembles from concurrent requests are."""

    def __init__(self, role: str):
        self.tags = {"role": role}
        self.batch = metrics.Histogram("distar_pool_batch_size", "Images per batch a pool replica ran.", BATCH_BOUNDS, tag_keys=("role",))

    def batch_ran(self, images: int) -> None:
        self.batch.observe(images, tags=self.tags)


class TrainerMetrics:
    """Trainer side: step time (and its parts), throughput, per-role request latency, the objective's terms."""

    def __init__(self, run: str):
        self.tags = {"run": run}
        self.step_time = metrics.Histogram("distar_step_time_s", "Wall time of one generator update (with its K fake-score updates).",
                                           LATENCY_BOUNDS, tag_keys=("run",))
        # Seconds spent in each part, summed over the steps: a counter, not a histogram, because Ray
        # exports a histogram's _sum approximated from its bucket midpoints, and per-part histograms
        # would then not add up. Divided by the step count, these give the mean time between two steps, exactly.
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

    def step_done(self, seconds: float, samples: int, values: dict[str, float], parts: dict[str, dict[str, float]], skipped_total: int) -> None:
        """parts: StepParts.take() of this step (its wall seconds by part are counted)."""
        self.step_time.observe(seconds, tags=self.tags)
        for part in STEP_PARTS:
            spent = parts["time"].get(part, 0.0)
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
