"""Trainer-side calls to the pools: send now, wait later, and send again if a replica died.

Serve re-routes a request only until a replica accepts it; a replica that dies while working on
it fails the call. The request is a pure function of its inputs, so sending it again (Serve
routes it to a live or replacement replica) loses no step and counts none twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from distar.cluster.transfer import moved
from distar.errors import RunFailed

RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, TimeoutError)


class PoolUnavailable(RunFailed):
    """A pool cannot serve the run: its replicas failed to start, or it failed the same request too many times."""


class RetryingCall:
    """One request in flight (the trainer's `Pending`): result() waits, re-sending on replica loss."""

    def __init__(self, method, args: tuple, role: str, attempts: int, timeout_s: float, on_done: Callable[[str, float], None],
                 device: torch.device):
        self.method, self.args, self.role, self.device = method, moved(args, "cpu"), role, device
        self.attempts, self.timeout_s, self.on_done = attempts, timeout_s, on_done
        self.start = time.perf_counter()
        self.response = method.remote(*self.args)

    def result(self) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                value = self.response.result(timeout_s=self.timeout_s)
                self.on_done(self.role, time.perf_counter() - self.start)
                return moved(value, self.device)
            except RETRYABLE as e:
                if attempt == self.attempts:
                    raise PoolUnavailable(f"{self.role} pool: a request failed {attempt} times; last error: {type(e).__name__}: {e}") from e
                print(f"{self.role} pool: request failed ({type(e).__name__}), sending it again ({attempt}/{self.attempts - 1})", flush=True)
                with contextlib.suppress(*RETRYABLE):  # Serve's cancel re-raises a request that never reached a replica
                    self.response.cancel()  # a request that timed out may still be running: not twice the load
                time.sleep(min(2.0 * attempt, 10.0))  # give Serve time to notice and replace the replica
                self.response = self.method.remote(*self.args)


def wait_running(apps: dict[str, str], every_s: float = 0.5) -> None:
    """Until Serve reports each pool's app ({role: app}) RUNNING; a pool whose replicas failed to
    start ends the run in one line with Serve's reason. Like a blocking deploy, it waits as long as
    the replicas take to load (a cluster short of resources keeps them pending)."""
    while True:
        statuses = serve.status().applications
        for role, app in apps.items():
            status = statuses.get(app)
            if status is not None and status.status == "DEPLOY_FAILED":
                reason = next((line for line in status.message.splitlines() if line.strip()), "no reason given")
                raise PoolUnavailable(f"{role} pool: its replicas failed to start: {reason}")
        if all(app in statuses and statuses[app].status == "RUNNING" for app in apps.values()):
            return
        time.sleep(every_s)


class PoolClients:
    """The two pool callables TrainerStep takes, backed by the pools' deployment handles."""

    def __init__(self, reward_handle, reference_handle, on_done: Callable[[str, float], None], timeouts_s: tuple[float, float] = (300.0, 300.0),
                 apps: dict[str, str] | None = None, attempts: int = 5):
        """`timeouts_s`: how long one request to the reward and to the reference pool may take.
        `apps`: the pools' Serve apps ({role: app}), which may still be loading their replicas (a run
        sets its trainer up meanwhile): the first request waits until they run."""
        self.reward, self.reference = reward_handle.score, reference_handle.query
        self.on_done, self.attempts, self.timeouts_s, self.loading = on_done, attempts, timeouts_s, apps

    def _send(self, method, request, role: str, timeout_s: float, device) -> RetryingCall:
        if self.loading:
            wait_running(self.loading)
            self.loading = None
        return RetryingCall(method, (request,), role, self.attempts, timeout_s, self.on_done, device)

    def score_rewards(self, request) -> RetryingCall:
        return self._send(self.reward, request, "reward", self.timeouts_s[0], request.x0.device)

    def query_reference(self, request) -> RetryingCall:
        return self._send(self.reference, request, "reference", self.timeouts_s[1], request.x_t.device)
