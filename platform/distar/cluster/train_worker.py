"""What every Ray Train worker runs: the run loop (distar.run.loop) in a runtime of DeepSpeed
engines, the pools called through Serve handles, Ray Train's checkpoints and reports, and the
run's Ray metrics.

Checkpoints hold both engines (ZeRO shards with their Adam states, one folder per rank that Ray
merges), each rank's piece of the generator's EMA and rank 0's progress; a resumed run continues identically. The loop's outcome on rank 0
is the return value the driver gets from TorchTrainer.fit().
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
from torch import nn

from distar.cluster import engines
from distar.cluster.calls import PoolClients
from distar.cluster.metrics import TrainerMetrics
from distar.config import RunConfig
from distar.roles.trainer import Update
from distar.run import guard
from distar.run.loop import RunLoop
from distar.run.resume import STATE_FILE, write_state
from distar.run.runtime import Outcome, Progress
from distar.run.timing import StepParts


class RayTrain:
    """The runtime of one Ray Train worker (distar.run.runtime.Runtime)."""

    all_ranks_agree = staticmethod(engines.all_ranks_agree)
    gathered = staticmethod(engines.gathered)

    def __init__(self, cfg: RunConfig, reward_handle, reference_handle, apps: dict[str, str]):
        context = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.metrics = TrainerMetrics(cfg.run.name)
        timeouts = (cfg.cluster.reward_pool.request_timeout_s, cfg.cluster.reference_pool.request_timeout_s)
        self.clients = PoolClients(reward_handle, reference_handle, self.metrics.request_done, timeouts, apps)
        self.networks: engines.Engines | None = None
        self.ema = None

    def pools(self, cfg: RunConfig, parts):
        return self.clients.score_rewards, self.clients.query_reference

    def updates(self, generator: nn.Module, fake: nn.Module, timing: StepParts) -> tuple[Update, Update]:
        self.networks = engines.Engines(generator, fake, self.cfg, timing, self.rank)
        self.ema = self.networks.ema
        return self.networks.updates()

    def restore(self) -> Progress | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            self.networks.read(d)
            return Progress(**json.loads((Path(d) / STATE_FILE).read_text()))

    def save(self, progress: Progress, report: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:  # one per rank; Ray merges them into one checkpoint
            self.networks.write(d)
            if self.rank == 0:
                write_state(Path(d), dataclasses.asdict(progress), self.cfg)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))

    def snapshot(self) -> None:
        self.networks.write(str(guard.folder(self.cfg)))  # one folder all ranks write into

    def rewind(self) -> None:
        self.networks.read(str(guard.folder(self.cfg)))

    def report(self, report: dict[str, float]) -> None:
        """Only rank 0's report reaches the driver and Tune; every rank reports (a barrier)."""
        ray.train.report(report)

    def step_done(self, seconds: float, samples: int, values: dict[str, float], parts: dict[str, dict[str, float]], skipped_total: int) -> None:
        self.metrics.step_done(seconds, samples, values, parts, skipped_total)


def train_worker(config: dict) -> Outcome:
    """TorchTrainer's train_loop_per_worker: config holds the run config, the pools' handles and rank 0's tracking target."""
    cfg = RunConfig.model_validate(config["run"])
    runtime = RayTrain(cfg, config["reward"], config["reference"], config["apps"])
    loop = RunLoop(cfg, runtime, log=lambda line: print(line, flush=True))
    return loop.run(config["tracking"] if runtime.rank == 0 else None)
