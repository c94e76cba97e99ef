"""StepParts: a step's wall and CPU seconds by part, nested parts counted once, in the innermost.
A hand-driven clock makes the figures exact: nothing here depends on how fast the machine is."""

import pytest
import torch
from torch import nn

from distar.roles.trainer import Later
from distar.run.timing import StepParts


class Clock:
    """A clock the test moves: `advance(wall, cpu)` seconds."""

    def __init__(self):
        self.now = (0.0, 0.0)

    def __call__(self) -> tuple[float, float]:
        return self.now

    def advance(self, wall: float, cpu: float | None = None) -> None:
        self.now = (self.now[0] + wall, self.now[1] + (wall if cpu is None else cpu))


def test_nested_parts_count_each_second_once_in_the_innermost():
    clock = Clock()
    timing = StepParts(clock)
    with timing.part("generator_update"):
        clock.advance(2)
        with timing.part("zero"):
            clock.advance(3, cpu=6)  # two threads busy
        clock.advance(1)
    clock.advance(0.5)
    parts = timing.take()
    assert parts["time"] == {"generator_update": 3, "zero": 3, "other": 0.5}
    assert parts["cpu"] == {"generator_update": 3, "zero": 6, "other": 0.5}
    clock.advance(1)
    assert timing.take() == {"time": {"other": 1}, "cpu": {"other": 1}}  # a take starts the next step from zero


def test_a_pending_call_is_timed_as_its_send_and_its_wait():
    clock = Clock()
    timing = StepParts(clock)

    def call(x):
        clock.advance(1)  # the send
        return Later(lambda: clock.advance(3) or x + 1)  # the work, done when the result is asked for

    pending = timing.waited("reward", call)(1)
    assert pending.result() == 2
    assert timing.take()["time"] == {"send": 1, "reward": 3, "other": 0}


def test_a_hooked_module_times_its_forwards_also_when_they_fail():
    clock = Clock()
    timing, net = StepParts(clock), nn.Linear(4, 4)
    net.register_forward_hook(lambda *_: clock.advance(2))  # runs inside the timed forward
    timing.hook("generator_forward", net)
    net(torch.zeros(2, 4))
    net.register_forward_pre_hook(lambda *_: clock.advance(1))
    with pytest.raises(RuntimeError):
        net(torch.zeros(2, 3))  # the wrong shape: the forward raises after a second
    assert timing.running == []  # the failed forward left its part
    assert timing.take()["time"] == {"generator_forward": 3, "other": 0}
