"""A pool replica's batching without Ray: concurrent requests merged into one call per objective,
each request given back its own rows, equal to calling the worker on each request alone."""

import torch

from distar.models.diffusion import Denoiser, load_parts
from distar.objectives import DivergenceSpec
from distar.roles.batching import run_merged
from distar.roles.reference_worker import ReferenceRequest, ReferenceWorker
from distar.roles.reward_worker import RewardRequest, RewardResult


def reference_request(parts, n: int, spec: DivergenceSpec, seed: int) -> ReferenceRequest:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *parts.latent_shape(32), generator=g, dtype=torch.float64)
    t = torch.randint(20, 980, (n,), generator=g)
    x_t = parts.schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    return ReferenceRequest(x_t, t, [f"a small red circle on the left {i}" for i in range(n)], x0, x0 + 0.1, spec)


def test_reference_requests_run_merged_by_objective_and_come_back_in_order(tiny_pipeline):
    parts = load_parts(tiny_pipeline, 1000, torch.float64)
    worker = ReferenceWorker(Denoiser(parts.unet, parts.schedule), parts.conditioner)
    score, kl = DivergenceSpec(cfg_scale=3.0), DivergenceSpec(kind="kl", cfg_scale=4.5)
    requests = [reference_request(parts, n, spec, seed) for seed, (n, spec) in enumerate([(2, score), (3, kl), (1, score)])]
    calls = []

    def call(merged):
        calls.append((len(merged), merged.spec))
        return worker(merged)

    merged = run_merged(call, requests, group=lambda r: r.spec)
    assert calls == [(3, score), (3, kl)]  # one call per objective, in order of arrival
    for request, result in zip(requests, merged):
        alone = worker(request)
        torch.testing.assert_close(result.d_ref, alone.d_ref, rtol=1e-9, atol=1e-12)
        assert (result.g_ref is None) == (alone.g_ref is None) == (request.spec.kind == "kl")
        if alone.g_ref is not None:
            torch.testing.assert_close(result.g_ref, alone.g_ref, rtol=1e-9, atol=1e-12)


def test_reward_results_split_into_each_requests_rows():
    requests = [RewardRequest(torch.full((n, 4, 2, 2), float(i)), [f"p{i}"] * n) for i, n in enumerate([2, 1, 3])]

    def score(merged):
        assert merged.prompts == ["p0", "p0", "p1", "p2", "p2", "p2"]
        mean = merged.x0.flatten(1).mean(1)
        return RewardResult({"pickscore": mean}, {"pickscore": merged.x0 * 2})

    results = run_merged(score, requests)
    for i, (request, result) in enumerate(zip(requests, results)):
        assert result.rewards["pickscore"].tolist() == [float(i)] * len(request)
        assert torch.equal(result.grads["pickscore"], request.x0 * 2)


def test_a_replica_waits_for_a_batch_only_when_several_clients_call_it():
    """One trainer worker sends one request at a time: holding it for others to join would add the
    window to every step. Two workers, or trials sharing the pools, can fill a batch."""
    from distar.cluster.pools import BATCH_WAIT_S, batch_wait_s

    assert batch_wait_s(1) == 0.0
    assert batch_wait_s(2) == batch_wait_s(8) == BATCH_WAIT_S > 0


def test_a_pool_sets_its_replicas_threads_only_when_told():
    """The default run's reference pool runs with 2 threads while the trainer waits for it; a pool
    without `threads` leaves Ray's rule (threads = num_cpus rounded down)."""
    from distar.cluster.pools import replica_env
    from distar.config import ClusterSection, PoolSpec

    defaults = ClusterSection()
    assert replica_env(defaults.reference_pool, {"A": "1"}) == {"A": "1", "OMP_NUM_THREADS": "2"}
    assert replica_env(defaults.reward_pool, {"A": "1"}) == {"A": "1"}
    assert replica_env(PoolSpec(threads=3), {}) == {"OMP_NUM_THREADS": "3"}
