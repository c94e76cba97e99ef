"""Where a step's time goes: wall and CPU seconds of the trainer's process, by part.

The loop hands the trainer step timed pool calls and updates and puts timing hooks on the
networks, so the trainer step itself stays free of timing code. Parts nest (DeepSpeed's gathers
run inside a forward, a forward inside an update's recomputation): each second counts in the
innermost part running, so the parts of a step add up to the time between two steps. CPU
seconds are the whole process's (torch's intra-op threads and Ray's own threads included): on a
2-core machine a part can take up to twice its wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

STEP_PARTS = (
    "text_encoder",  # the prompts' conditioning
    "generator_forward",  # every generator forward of the step (the fake score's samples and the generator update's)
    "fake_forward",  # the fake score's forwards
    "send",  # handing a request to a pool (on Ray: to the object store)
    "reward",  # waiting for the reward pool (a reward call overlaps the fake forward: only what is left of it)
    "reference",  # waiting for the reference pool
    "fake_score_update",  # backward and optimiser step of the fake score
    "generator_update",  # backward and optimiser step of the generator
    "zero",  # DeepSpeed ZeRO-3's parameter gathers and releases and its gradient reduce-scatter, wherever they run
    "loop",  # the run loop's own work between steps: records, validation, reports, checkpoints
    "other",  # the rest: noise draws, the objective's arithmetic, the ranks' skip agreement
)


def process_clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) now."""
    return time.perf_counter(), time.process_time()


class _Pending:
    """A pending pool result whose result() is timed as the wait for that pool."""

    def __init__(self, result: Callable[[], Any]):
        self.result = result


class StepParts:
    """Seconds of the current step in each part, wall ("time") and CPU, charged by the callables,
    hooks and contexts it hands out; take() returns them and starts the next step from zero."""

    def __init__(self, clock: Callable[[], tuple[float, float]] = process_clock):
        self.clock = clock
        self.seconds = {"time": defaultdict(float), "cpu": defaultdict(float)}
        self.running: list[str] = []  # the parts entered and not yet left, innermost last
        self.mark = clock()

    def _charge(self) -> None:
        """The time since the last mark goes to the innermost running part."""
        now, part = self.clock(), self.running[-1] if self.running else "other"
        for kind, was, is_ in zip(self.seconds, self.mark, now):
            self.seconds[kind][part] += is_ - was
        self.mark = now

    def enter(self, part: str) -> None:
        self._charge()
        self.running.append(part)

    def leave(self) -> None:
        self._charge()
        self.running.pop()

    @contextlib.contextmanager
    def part(self, part: str) -> Iterator[None]:
        self.enter(part)
        try:
            yield
        finally:
            self.leave()

    def timed(self, part: str, call: Callable) -> Callable:
        def run(*args, **kwargs):
            with self.part(part):
                return call(*args, **kwargs)

        return run

    def waited(self, part: str, call: Callable) -> Callable:
        """For a call that returns a pending result: the call is the send, its result() the wait."""
        return lambda *args, **kwargs: _Pending(self.timed(part, self.timed("send", call)(*args, **kwargs).result))

    def hook(self, part: str, module: nn.Module) -> None:
        """Every forward of `module` counts as `part`."""
        module.register_forward_pre_hook(lambda *_: self.enter(part))
        module.register_forward_hook(lambda *_: self.leave(), always_call=True)

    def take(self) -> dict[str, dict[str, float]]:
        """{"time": {part: wall s}, "cpu": {part: CPU s}} since the last take; the next step starts from zero."""
        self._charge()
        taken = {kind: dict(by_part) for kind, by_part in self.seconds.items()}
        self.seconds = {kind: defaultdict(float) for kind in self.seconds}
        return taken
