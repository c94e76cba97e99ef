"""What the trainer sends a pool (distar.cluster.calls): CPU float32 tensors, on the first send
and on the re-send after a replica died, and never the caller's own objects."""

import pytest
import torch
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from distar.cluster.calls import PoolUnavailable, RetryingCall, wait_running
from distar.roles.reward_worker import RewardRequest


class Response:
    """Like Serve's DeploymentResponse: cancel() first waits for the request to be assigned, so a
    request no replica could take raises its error there too."""

    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def cancel(self):
        if isinstance(self.outcome, DeploymentUnavailableError):
            raise self.outcome
        self.cancelled = True

    def result(self, timeout_s):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class Replicas:
    """Stands in for a deployment handle's method: records every request it is sent; the first
    replica dies while working on it, the next one answers."""

    def __init__(self, first_failure: Exception | None = None):
        self.sent, self.responses, self.first_failure = [], [], first_failure or RayActorError()

    def remote(self, request):
        self.sent.append(request)
        self.responses.append(Response(self.first_failure if len(self.sent) == 1 else {"x0": request.x0 * 2}))
        return self.responses[-1]


def test_first_send_and_re_send_carry_cpu_float32_copies():
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)[:, :2]  # a live, strided view of a trainer tensor
    request = RewardRequest(x0, ["a", "b"])
    replicas = Replicas()
    call = RetryingCall(replicas, (request,), "reward", attempts=2, timeout_s=1, on_done=lambda role, s: None, device=torch.device("cpu"))
    result = call.result()
    assert len(replicas.sent) == 2 and replicas.sent[0] is replicas.sent[1] is not request
    sent = replicas.sent[0].x0
    assert (sent.device.type, sent.dtype, sent.requires_grad) == ("cpu", torch.float32, False)
    assert torch.equal(sent, x0.detach()) and torch.equal(result["x0"], 2 * x0.detach())


def test_a_request_that_timed_out_is_cancelled_before_it_is_sent_again():
    replicas = Replicas(first_failure=TimeoutError("no answer in 1 s"))
    call = RetryingCall(replicas, (RewardRequest(torch.zeros(1, 4, 8, 8), ["a"]),), "reward", attempts=2, timeout_s=1,
                        on_done=lambda role, s: None, device=torch.device("cpu"))
    call.result()
    assert [r.cancelled for r in replicas.responses] == [True, False]


def test_a_pool_gone_for_good_fails_the_call_in_one_line_after_its_attempts(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)  # the pauses between attempts

    class Gone(Replicas):
        def remote(self, request):
            self.sent.append(request)
            self.responses.append(Response(DeploymentUnavailableError("RewardPool")))
            return self.responses[-1]

    replicas = Gone()
    call = RetryingCall(replicas, (RewardRequest(torch.zeros(1, 4, 8, 8), ["a"]),), "reward", attempts=3, timeout_s=1,
                        on_done=lambda role, s: None, device=torch.device("cpu"))
    with pytest.raises(PoolUnavailable, match=r"^error: reward pool: a request failed 3 times; last error: DeploymentUnavailableError"):
        call.result()
    assert len(replicas.sent) == 3


def serve_reporting(*rounds: dict[str, tuple[str, str]]):
    """serve.status() as Serve reports it: one round of {app: (status, message)} per call, the last repeated."""
    from ray.serve.schema import ApplicationStatusOverview, ServeStatus

    calls = []

    def status():
        state = rounds[min(len(calls), len(rounds) - 1)]
        calls.append(state)
        return ServeStatus(applications={app: ApplicationStatusOverview(status=s, message=m, last_deployed_time_s=0.0, deployments={})
                                         for app, (s, m) in state.items()})

    return status, calls


def test_waiting_ends_once_both_pools_run(monkeypatch):
    status, calls = serve_reporting({}, {"r": ("DEPLOYING", ""), "f": ("DEPLOYING", "")}, {"r": ("RUNNING", ""), "f": ("DEPLOYING", "")},
                                    {"r": ("RUNNING", ""), "f": ("RUNNING", "")})
    monkeypatch.setattr("distar.cluster.calls.serve.status", status)
    wait_running({"reward": "r", "reference": "f"}, every_s=0)
    assert len(calls) == 4


def test_a_pool_that_cannot_start_ends_the_run_in_one_line(monkeypatch):
    reason = "\nThe deployments ['ReferencePool'] are UNHEALTHY: replica constructor failed\nTraceback (most recent call last): ..."
    status, _ = serve_reporting({"r": ("DEPLOYING", ""), "f": ("DEPLOYING", "")}, {"r": ("RUNNING", ""), "f": ("DEPLOY_FAILED", reason)})
    monkeypatch.setattr("distar.cluster.calls.serve.status", status)
    with pytest.raises(PoolUnavailable) as failed:
        wait_running({"reward": "r", "reference": "f"}, every_s=0)
    assert failed.value.status == 1  # the run started: exit 1, the run FAILED
    assert str(failed.value) == "error: reference pool: its replicas failed to start: The deployments ['ReferencePool'] are UNHEALTHY: replica constructor failed"
