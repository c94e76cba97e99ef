"""The generator's exponential moving average (optim.ema_decay), after every applied update:

    average <- decay * average + (1 - decay) * weights

kept on each trainer rank's own piece of every trainable parameter: the whole parameter in one
process and under ZeRO-1/2, under ZeRO-3 the rank's partition (p.ds_tensor, which its optimiser
steps). So the average costs one float32 copy of what the rank already holds and is never gathered
to be updated. Validation and the export see it by putting the averages in place of the weights
(`applied()`) and gathering as they always do. A skipped update (non-finite gradient) leaves the
average as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from distar.errors import UserError
from distar.roles.trainer import Update


def held(p: nn.Parameter) -> Tensor:
    """The piece of `p` this rank holds and steps: its ZeRO-3 partition, or the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def released(params: list[nn.Parameter]) -> None:
    """ZeRO-3 keeps its small parameters gathered between steps (p.ds_persist) and releases them only
    around its own step. Partitions just written must be gathered again: release those gathered (their
    partitions stay as they are), and the next forward or gather fetches them from the partitions."""
    if params and hasattr(params[0], "ds_tensor"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)


class GeneratorEMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.average = [held(p).detach().float().clone() for p in self.params]  # float32 whatever the weights' dtype

    @classmethod
    def of(cls, module: nn.Module, decay: float | None) -> GeneratorEMA | None:
        """The average of `module`'s weights as they are now (after the engines have partitioned them), or None when off."""
        return None if decay is None else cls(module, decay)

    @torch.no_grad()
    def update(self) -> None:
        for average, p in zip(self.average, self.params):
            average.lerp_(held(p).float(), 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in place of the weights on this rank (every rank enters, as every rank
        gathers); the weights are copied back after. In place: the optimiser may hold the same buffers."""
        weights = [held(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for average, p in zip(self.average, self.params):
                held(p).copy_(average)
        released(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for w, p in zip(weights, self.params):
                    held(p).copy_(w)
            released(self.params)

    def save(self, folder: Path, rank: int) -> None:
        torch.save(self.average, Path(folder) / f"ema_rank{rank}.pt")

    def load(self, folder: Path, rank: int) -> None:
        path = Path(folder) / f"ema_rank{rank}.pt"
        if not path.is_file():
            raise UserError(f"{path.parent} holds no generator EMA for rank {rank}: the run that wrote it had optim.ema_decay off "
                            "(turn it off to continue that run, or give this run another run.output_dir)")
        for average, saved in zip(self.average, torch.load(path, weights_only=True), strict=True):
            average.copy_(saved)


def with_average(update: Update, ema: GeneratorEMA | None) -> Update:
    """The generator's `update`, followed by the average's when the update was applied (its gradient norm finite)."""
    if ema is None:
        return update

    def updated(loss: Tensor) -> float:
        norm = update(loss)
        if math.isfinite(norm):
            ema.update()
        return norm

    return updated
