"""The reward and reference pools as Ray Serve deployments.

Serve gives each pool its replicas, load balancing, restarts of dead replicas, and dynamic
batching: concurrent requests from all trainer ranks (and from concurrent Tune trials) are
concatenated into one forward pass by `serve.batch`. The replicas hold the plain role classes
of distar.roles, built from the run's config exactly as the in-process runner builds them.
Apps get no HTTP route: the trainer calls them through deployment handles, tensors through the
object store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from ray import serve

from distar.cluster.metrics import RoleMetrics
from distar.cluster.transfer import local_device, moved
from distar.config import RunConfig
from distar.roles import from_config
from distar.roles.reference_pool import ReferenceRequest, ReferenceResult
from distar.roles.reward_worker import RewardResult


def _images(first_args: list) -> int:
    """serve.batch sizes a batch by images, not requests (a request carries a trainer's batch)."""
    return sum(len(x) for x in first_args)


def _split(tensor: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if tensor is None else list(tensor.split(sizes))


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=5, max_constructor_retry_count=3)
class RewardScorer:
    def __init__(self, cfg: dict):
        run, self.device = RunConfig.model_validate(cfg), local_device()
        self.worker = from_config.reward_worker(run, self.device)
        self.score.set_max_batch_size(run.cluster.reward_pool.max_batch_size)
        self.metrics = RoleMetrics("reward")

    @serve.batch(batch_size_fn=_images, batch_wait_timeout_s=0.01)
    async def score(self, x0: list[torch.Tensor], prompts: list[list[str]]) -> list[RewardResult]:
        sizes = [len(p) for p in prompts]
        out = moved(self.worker(torch.cat(x0).to(self.device), [p for ps in prompts for p in ps]), "cpu")
        self.metrics.batch_ran(sum(sizes))
        rewards = {k: v.split(sizes) for k, v in out.rewards.items()}
        grads = {k: v.split(sizes) for k, v in out.grads.items()}
        return [RewardResult({k: v[i] for k, v in rewards.items()}, {k: v[i] for k, v in grads.items()}) for i in range(len(sizes))]


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=5, max_constructor_retry_count=3)
class ReferenceDenoiser:
    def __init__(self, cfg: dict):
        run, self.device = RunConfig.model_validate(cfg), local_device()
        self.pool = from_config.reference_pool(from_config.reference_parts(run, self.device))
        self.query.set_max_batch_size(run.cluster.reference_pool.max_batch_size)
        self.metrics = RoleMetrics("reference")

    @serve.batch(batch_size_fn=_images, batch_wait_timeout_s=0.01)
    async def query(self, requests: list[ReferenceRequest]) -> list[ReferenceResult]:
        # Requests of different objectives (Tune trials sharing the pool) run as separate groups.
        results: list[ReferenceResult | None] = [None] * len(requests)
        for spec in {r.spec for r in requests}:
            members = [i for i, r in enumerate(requests) if r.spec == spec]
            group = [requests[i] for i in members]
            merged = ReferenceRequest(
                torch.cat([r.x_t for r in group]), torch.cat([r.t for r in group]), [p for r in group for p in r.prompts],
                torch.cat([r.x0 for r in group]), torch.cat([r.d_fake for r in group]), spec,
            )
            out, sizes = moved(self.pool(moved(merged, self.device)), "cpu"), [len(r.prompts) for r in group]
            self.metrics.batch_ran(sum(sizes))
            for i, d_ref, g_ref in zip(members, out.d_ref.split(sizes), _split(out.g_ref, sizes)):
                results[i] = ReferenceResult(d_ref, g_ref)
        return results


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
    def start(cls, cfg: RunConfig, env: dict[str, str]) -> Pools:
        """Deploy both pools (replicas get `env`) and wait until every replica has loaded its models."""
        start_serve()
        tag = f"distar-{cfg.run.name}-{uuid.uuid4().hex[:6]}"
        payload = cfg.model_dump(mode="json")
        names, handles = (f"{tag}-rewards", f"{tag}-reference"), []
        for name, deployment, pool in zip(names, (RewardScorer, ReferenceDenoiser), (cfg.cluster.reward_pool, cfg.cluster.reference_pool)):
            options = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "runtime_env": {"env_vars": env}}
            # no per-request access lines: a run makes several requests a step
            app = deployment.options(num_replicas=pool.replicas, ray_actor_options=options, logging_config={"enable_access_log": False}).bind(payload)
            handles.append(serve.run(app, name=name, route_prefix=None))
        return cls(names, *handles)

    def shutdown(self) -> None:
        for app in self.apps:
            serve.delete(app)
