"""The reward and reference pools as Ray Serve deployments.

Serve gives each pool its replicas, load balancing, restarts of dead replicas, and dynamic
batching: concurrent requests from all trainer ranks (and from concurrent Tune trials) are
concatenated into one forward pass (`serve.batch` collects them, distar.roles.batching merges
them). Each replica holds one worker of distar.roles, built from the run's config exactly as the
in-process runtime builds it.
Apps get no HTTP route: the trainer calls them through deployment handles, tensors through the
object store.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ray import serve

from distar.cluster.metrics import RoleMetrics
from distar.cluster.transfer import local_device, moved
from distar.config import PoolSpec, RunConfig
from distar.roles.batching import run_merged
from distar.roles.reference_worker import ReferenceRequest, ReferenceResult
from distar.roles.reward_worker import RewardRequest, RewardResult
from distar.run import build
from distar.tracking.store import safe_tree

BATCH_WAIT_S = 0.01  # how long a replica holds a request for others to join its batch, when others can come


def batch_wait_s(clients: int) -> float:
    """With one client (one trainer worker, no concurrent trials) no other request can join a
    batch: waiting would only add to every step."""
    return BATCH_WAIT_S if clients > 1 else 0.0


def replica_env(pool: PoolSpec, env: dict[str, str]) -> dict[str, str]:
    """A replica's environment: `env`, and its torch threads where the pool sets them (Ray sets
    OMP_NUM_THREADS from num_cpus only when it is not set)."""
    return {**env, "OMP_NUM_THREADS": str(pool.threads)} if pool.threads else dict(env)


def _images(requests: list) -> int:
    """serve.batch sizes a batch by images, not requests (a request carries a trainer's batch)."""
    return sum(len(r) for r in requests)


class _Pool:
    """One replica: a worker of the role on this replica's device, running concurrent requests merged."""

    @staticmethod
    def _batching(method, pool: PoolSpec, clients: int) -> None:
        """The batch a replica assembles for `method` (a serve.batch method): at most the pool's
        max_batch_size images, waiting for more only when other clients can send them."""
        method.set_max_batch_size(pool.max_batch_size)
        method.set_batch_wait_timeout_s(batch_wait_s(clients))

    def _run(self, requests: list, group=lambda r: None) -> list:
        def call(merged):
            self.metrics.batch_ran(len(merged))
            return moved(self.worker(moved(merged, self.device)), "cpu")

        return run_merged(call, requests, group)


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=5, max_constructor_retry_count=3)
class RewardPool(_Pool):
    def __init__(self, cfg: dict, clients: int):
        run, self.device = RunConfig.model_validate(cfg), local_device()
        self.worker = build.reward_worker(run, self.device)
        self._batching(self.score, run.cluster.reward_pool, clients)
        self.metrics = RoleMetrics("reward")

    @serve.batch(batch_size_fn=_images, batch_wait_timeout_s=BATCH_WAIT_S)
    async def score(self, requests: list[RewardRequest]) -> list[RewardResult]:
        return self._run(requests)


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=5, max_constructor_retry_count=3)
class ReferencePool(_Pool):
    def __init__(self, cfg: dict, clients: int):
        run, self.device = RunConfig.model_validate(cfg), local_device()
        self.worker = build.reference_worker(run, build.reference_parts(run, self.device))
        self._batching(self.query, run.cluster.reference_pool, clients)
        self.metrics = RoleMetrics("reference")

    @serve.batch(batch_size_fn=_images, batch_wait_timeout_s=BATCH_WAIT_S)
    async def query(self, requests: list[ReferenceRequest]) -> list[ReferenceResult]:
        return self._run(requests, group=lambda r: r.spec)  # Tune trials sharing the pool may differ in objective


# Each role's Ray actor class, as process titles (`ray::<class>...`) and Ray's state API name it.
ACTOR_CLASSES = {"reward": RewardPool.name, "reference": ReferencePool.name, "trainer": "RayTrainWorker"}


def start_serve() -> None:
    """Serve without an HTTP proxy: only handles reach the pools. A sweep starts it from its driver,
    where the controller lands outside every trial's placement group."""
    serve.start(proxy_location="Disabled")


@dataclass
class Pools:
    """The Serve apps a run (or a sweep) started; handles pickle into Ray Train workers."""

    apps: tuple[str, str]
    reward: serve.handle.DeploymentHandle
    reference: serve.handle.DeploymentHandle

    @classmethod
    def start(cls, cfg: RunConfig, env: dict[str, str], clients: int, wait: bool = True) -> Pools:
        """Deploy both pools (replicas get `env`) for `clients` trainer workers calling them at once,
        and wait until every replica has loaded its models (`wait=False`: return once Serve has the
        apps; the callers' first requests wait, see distar.cluster.calls.wait_running)."""
        start_serve()
        tag = f"distar-{cfg.run.name}-{uuid.uuid4().hex[:6]}"
        payload = safe_tree(cfg.model_dump(mode="json"))  # Serve shows deployments' arguments: no credentials in them
        names, targets = (f"{tag}-rewards", f"{tag}-reference"), []
        for name, deployment, pool in zip(names, (RewardPool, ReferencePool), (cfg.cluster.reward_pool, cfg.cluster.reference_pool)):
            options = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "runtime_env": {"env_vars": replica_env(pool, env)}}
            # no per-request access lines: a run makes several requests a step
            app = deployment.options(num_replicas=pool.replicas, ray_actor_options=options, logging_config={"enable_access_log": False}).bind(payload, clients)
            targets.append(serve.RunTarget(app, name=name, route_prefix=None))
        return cls(names, *serve.run_many(targets, wait_for_applications_running=wait))  # both pools load at once

    @property
    def by_role(self) -> dict[str, str]:
        """{role: app}: what the trainer's clients wait on before their first request."""
        return dict(zip(("reward", "reference"), self.apps))

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Delete both apps at once and wait (bounded) until Serve has removed them."""
        for app in self.apps:
            serve.delete(app, _blocking=False)
        deadline = time.monotonic() + timeout_s
        while any(app in serve.status().applications for app in self.apps) and time.monotonic() < deadline:
            time.sleep(0.2)
