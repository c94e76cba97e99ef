"""StepParts: a step's wall and CPU seconds by part, nested parts counted once, in the innermost."""

import time

import torch
from torch import nn

from distar.roles.trainer import Later
from distar.run.timing import StepParts


def busy(seconds: float) -> None:
    """Spend CPU (not sleep) for about `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_parts_count_each_second_once_in_the_innermost():
    timing = StepParts()
    timing.take()
    start = time.perf_counter()
    with timing.part("generator_update"):
        busy(0.02)
        with timing.part("zero"):
            busy(0.03)
        busy(0.01)
    busy(0.01)
    elapsed = time.perf_counter() - start
    parts = timing.take()
    wall = parts["wall"]
    assert 0.028 <= wall["generator_update"] < 0.045 and 0.028 <= wall["zero"] < 0.045
    assert wall["other"] >= 0.009  # outside every part
    assert abs(sum(wall.values()) - elapsed) < 0.005  # the parts add up to the time between takes
    assert parts["cpu"]["zero"] > 0.02  # busy work is CPU time too
    assert timing.take()["wall"].keys() == {"other"}  # a take starts the next step from zero


def test_a_pending_call_is_timed_as_its_send_and_its_wait():
    timing = StepParts()

    def call(x):
        busy(0.01)  # the send
        return Later(lambda: busy(0.03) or x + 1)  # the work, done when the result is asked for

    waited = timing.waited("reward", call)
    timing.take()
    pending = waited(1)
    assert pending.result() == 2
    wall = timing.take()["wall"]
    assert 0.009 <= wall["send"] < 0.025 and 0.028 <= wall["reward"] < 0.045


def test_a_hooked_module_times_its_forwards_also_when_they_fail():
    timing, net = StepParts(), nn.Linear(4, 4)
    timing.hook("generator_forward", net)
    timing.take()
    net(torch.zeros(2, 4))
    try:
        net(torch.zeros(2, 3))  # the wrong shape: the forward raises
    except RuntimeError:
        pass
    else:
        raise AssertionError("the forward should have failed")
    assert timing.running == []  # the failed forward left its part
    assert timing.take()["wall"]["generator_forward"] > 0
