"""TrainerStep's own rules, in one process: ranks' shards add up to the whole batch's gradient, a
non-finite reward or loss skips the update without touching the weights, and the generator's
update never reaches the fake score's parameters, with torch's AdamW and with DeepSpeed ZeRO-3
engines (the Ray runtime's engine code, on gloo in this process: its CPU twin)."""

import copy
import math

import pytest
import torch

from distar.config import load_config
from distar.roles.reward_worker import RewardResult
from distar.roles.trainer import Later, Shard, TrainerStep
from distar.run import in_process
from distar.run.loop import RunLoop

SMOKE = "jobs/configs/smoke.yaml"


@pytest.fixture
def run():
    return in_process.run_loop(load_config(SMOKE, ["data.batch_size=4"]))


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
        t.generator_loss(t.sample(prompts[rows], d))[0].backward()
        grads.append(flat_grad(trainer.generator))
    whole, half_0, half_1 = grads
    assert ((half_0 + half_1) / 2 - whole).norm() / whole.norm() < 1e-5


def test_shard_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="global batch 5 does not split over 2"):
        Shard(1, 2).rows(5)


def test_non_finite_reward_skips_the_generator_update(run):
    trainer = run.trainer
    worker = trainer.score_rewards

    def poisoned(request):
        result = worker(request).result()
        return Later(lambda: RewardResult({**result.rewards, "pickscore": result.rewards["pickscore"] * float("nan")}, result.grads))

    skipping = TrainerStep(trainer.generator, trainer.fake, trainer.conditioner, trainer.latent_shape, run.cfg.objective, run.cfg.rewards,
                           run.cfg.optim, score_rewards=poisoned, query_reference=trainer.query_reference,
                           updates=(trainer.gen_update, trainer.fake_update))
    before_gen, before_fake = params(trainer.generator), params(trainer.fake)
    values = skipping.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    assert values["skipped"] == 1.0 and "grad_norm/generator" not in values
    assert torch.equal(params(trainer.generator), before_gen)  # the generator kept its weights
    assert not torch.equal(params(trainer.fake), before_fake)  # the fake score's update was finite, so it ran
    assert skipping.step(run.sampler.batch(1), torch.Generator().manual_seed(1))["skipped"] == 1.0


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_update(run):
    trainer = run.trainer
    hook = next(trainer.generator.parameters()).register_hook(lambda grad: grad * float("inf"))
    before = params(trainer.generator)
    values = trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    hook.remove()
    assert values["skipped"] == 1.0 and math.isfinite(values["loss/generator"]) and not math.isfinite(values["grad_norm/generator"])
    assert torch.equal(params(trainer.generator), before)


def spied(trainer: TrainerStep) -> list[str]:
    """Wrap the trainer's generator update so that any gradient computed for a fake-score
    parameter while it runs is recorded (by the parameter's name); returns that record."""
    leaks, armed = [], [False]
    for name, p in trainer.fake.named_parameters():
        p.register_hook(lambda grad, name=name: leaks.append(name) if armed[0] else None)
    update = trainer.gen_update

    def generator_update(loss):
        armed[0] = True
        try:
            return update(loss)
        finally:
            armed[0] = False

    trainer.gen_update = generator_update
    return leaks


def two_steps(run: RunLoop) -> list[str]:
    """Two full steps (K fake-score updates, then the generator's); the fake score's parameters
    that got a gradient from the generator's update."""
    leaks = spied(run.trainer)
    rng = torch.Generator().manual_seed(0)
    for step in range(2):
        values = run.trainer.step(run.sampler.batch(step), rng)
        assert values["skipped"] == 0 and "grad_norm/generator" in values
    return leaks


def test_the_generator_update_leaves_the_fake_score_alone(run):
    """The spy sees the fake score's own updates' gradients, so it can see a leak: this fails if
    TrainerStep.step stops freezing the fake score around the generator's loss and update."""
    assert two_steps(run) == []


@pytest.mark.slow
def test_under_deepspeed_zero3_the_generator_update_leaves_the_fake_score_alone(deepspeed_here, tmp_path):
    cfg = load_config(SMOKE, ["data.batch_size=4", "cluster.zero_stage=3", f"run.output_dir={tmp_path}"])
    run = RunLoop(cfg, deepspeed_here(cfg), log=lambda line: None)
    run.timing.take()
    assert two_steps(run) == []
    assert all(torch.isfinite(p.ds_tensor).all() for p in run.generator.parameters())  # gloo gathers have raced into NaNs upstream
    assert run.timing.take()["time"]["zero"] > 0  # ZeRO-3's own work is timed as its own part


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])  # one worker's default, and several workers'
def test_a_deepspeed_step_equals_the_adamw_step(deepspeed_here, tmp_path, stage):
    """One update through ZeRO engines moves the generator as torch's AdamW does (what the Ray
    tests check across processes, here without Ray)."""
    from distar.cluster.engines import gathered

    cfg = load_config(SMOKE, ["data.batch_size=4", "optim.generator.eps=1e-5", f"cluster.zero_stage={stage}", f"run.output_dir={tmp_path}"])
    expected = in_process.run_loop(cfg, log=lambda line: None)
    expected.trainer.step(expected.sampler.batch(0), torch.Generator().manual_seed(0))
    run = RunLoop(cfg, deepspeed_here(cfg), log=lambda line: None)
    run.trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    with gathered(run.generator):
        got = params(run.generator)
    assert torch.isfinite(got).all()
    assert (got - params(expected.generator)).abs().max() < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_under_deepspeed_a_non_finite_gradient_skips_the_update(deepspeed_here, tmp_path, stage):
    from distar.cluster.engines import gathered

    cfg = load_config(SMOKE, ["data.batch_size=4", f"cluster.zero_stage={stage}", f"run.output_dir={tmp_path}"])
    run = RunLoop(cfg, deepspeed_here(cfg), log=lambda line: None)
    with gathered(run.generator):
        before = params(run.generator)
    hook = next(run.generator.parameters()).register_hook(lambda grad: grad * float("inf"))
    values = run.trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    hook.remove()
    assert values["skipped"] == 1.0 and math.isfinite(values["loss/generator"]) and not math.isfinite(values["grad_norm/generator"])
    with gathered(run.generator):
        assert torch.equal(params(run.generator), before)


def test_the_reward_request_goes_out_before_the_fake_score_trains(run):
    """The generator's sample does not depend on the fake score: its request is sent first, so a
    reward pool scores it while the trainer runs the K fake-score updates; it is awaited only then."""
    trainer, order = run.trainer, []
    score, fake_update = trainer.score_rewards, trainer.fake_update

    def score_rewards(request):
        order.append("sent")
        pending = score(request)
        return Later(lambda: order.append("awaited") or pending.result())

    trainer.score_rewards = score_rewards
    trainer.fake_update = lambda loss: order.append("fake update") or fake_update(loss)
    trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    assert order == ["sent", *["fake update"] * run.cfg.optim.fake_updates_per_step, "awaited"]


def test_the_zero_stage_fits_the_worker_count_unless_set():
    """One worker has nothing to shard: ZeRO-1 by default. Across workers ZeRO-3 shards parameters
    of 1e5 elements and more; gradients and Adam states stay sharded whatever the threshold."""
    from distar.cluster.engines import ds_config

    def zero(*sets):
        cfg = load_config(SMOKE, list(sets))
        return ds_config(cfg, cfg.optim.generator)["zero_optimization"]

    assert zero()["stage"] == 1 and zero("cluster.trainer_workers=2")["stage"] == 3
    assert zero("cluster.zero_stage=2", "cluster.trainer_workers=2")["stage"] == 2
    assert zero("cluster.trainer_workers=2")["stage3_param_persistence_threshold"] == 100_000
