"""TrainerStep's own rules, in one process: ranks' shards add up to the whole batch's gradient,
and a non-finite reward or loss skips the update without touching the weights."""

import copy

import pytest
import torch

from distar.config import load_config
from distar.roles.in_process import build
from distar.roles.reward_worker import RewardResult
from distar.roles.trainer import Ready, Shard, TrainerStep

SMOKE = "jobs/configs/smoke.yaml"


@pytest.fixture
def run():
    return build(load_config(SMOKE, ["data.batch_size=4"]))


def flat_grad(module):
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def params(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_shards_average_to_the_whole_batch_gradient(run):
    """What DeepSpeed does across ranks (average the shards' gradients) gives the gradient of
    the whole batch: rank r draws the same global noise and keeps its rows."""
    trainer, prompts = run.trainer, run.sampler.batch(0)
    grads = []
    for shard in (Shard(0, 1), Shard(0, 2), Shard(1, 2)):
        t = copy.copy(trainer)
        t.shard = shard
        rows = shard.rows(len(prompts))
        d = t.draw(len(prompts), torch.Generator().manual_seed(3))[rows]
        trainer.generator.zero_grad()
        t.generator_loss(prompts[rows], d)[0].backward()
        grads.append(flat_grad(trainer.generator))
    whole, half_0, half_1 = grads
    assert ((half_0 + half_1) / 2 - whole).norm() / whole.norm() < 1e-5


def test_shard_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="global batch 5 does not split over 2"):
        Shard(1, 2).rows(5)


def test_non_finite_reward_skips_the_generator_update(run):
    trainer = run.trainer
    worker = trainer.score_rewards

    def poisoned(x0, prompts):
        result = worker(x0, prompts).result()
        return Ready(RewardResult({**result.rewards, "pickscore": result.rewards["pickscore"] * float("nan")}, result.grads))

    skipping = TrainerStep(trainer.generator, trainer.fake, trainer.conditioner, trainer.latent_shape, run.cfg.objective, run.cfg.rewards,
                           run.cfg.optim, score_rewards=poisoned, query_reference=trainer.query_reference)
    before_gen, before_fake = params(trainer.generator), params(trainer.fake)
    values = skipping.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    assert values["skipped"] == 1.0 and "grad_norm/generator" not in values
    assert torch.equal(params(trainer.generator), before_gen)  # the generator kept its weights
    assert not torch.equal(params(trainer.fake), before_fake)  # the fake score's update was finite, so it ran
    assert skipping.step(run.sampler.batch(1), torch.Generator().manual_seed(1))["skipped"] == 1.0
