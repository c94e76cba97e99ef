"""The in-process runtime with the Ray runtime's DeepSpeed engines in place of torch's AdamW: one
rank of a torch.distributed group its caller started (gloo on CPU), without Ray or Serve.

It is the CPU twin of a Ray Train worker (distar.cluster.train_worker) for the tests, and what
bench/memory.py measures ZeRO with across processes. Its pools are the in-process ones: each rank
holds its own reward and reference workers.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from distar.cluster import engines
from distar.config import RunConfig
from distar.roles.trainer import Update
from distar.run.in_process import InProcess
from distar.run.timing import StepParts


class LocalEngines(InProcess):
    all_ranks_agree = staticmethod(engines.all_ranks_agree)
    gathered = staticmethod(engines.gathered)

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.engines: engines.Engines | None = None

    def updates(self, generator: nn.Module, fake: nn.Module, timing: StepParts) -> tuple[Update, Update]:
        self.engines = engines.Engines(generator, fake, self.cfg, timing, self.rank)
        self.ema = self.engines.ema
        return self.engines.updates()

    def _write(self, folder: Path) -> None:  # as the Ray runtime keeps checkpoints and the guard's generator
        self.engines.write(str(folder))

    def _read(self, folder: Path) -> None:
        self.engines.read(str(folder))
