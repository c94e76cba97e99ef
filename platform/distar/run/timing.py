"""Where a step's wall time goes: the loop hands the trainer step timed pool calls and optimiser
updates, so the trainer step itself stays free of timing code.

Parts are timed where the trainer waits for them, so a reward call that overlaps the fake
score's forward costs only what is left of it. "forward" is the rest of the step: the trainer's
own forward passes (generator, fake score, text encoder), the noise draws and the ranks' skip
agreement.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

STEP_PARTS = ("reward", "reference", "fake_score_update", "generator_update", "forward")


class _Waited:
    """A pending result whose result() is timed (the part of a call the trainer waits for)."""

    def __init__(self, result: Callable[[], Any]):
        self.result = result


class StepParts:
    """Seconds of the current step spent in each part, added up by the callables it wraps."""

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

    def take(self, step_seconds: float) -> dict[str, float]:
        """The step's seconds per part, "forward" being what the timed parts leave of `step_seconds`,
        and start the next step from zero."""
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        seconds["forward"] = max(step_seconds - sum(seconds.values()), 0.0)
        return seconds
