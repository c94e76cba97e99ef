"""The generator's EMA (optim.ema_decay): its rule on a module's weights, and runs that validate,
checkpoint, resume and export it, in one process, on DeepSpeed ZeRO-3 engines (the CPU twin) and
across two Ray Train ranks that each hold half of it."""

import math

import pytest
import torch
from torch import nn

from distar.config import ConfigError, load_config
from distar.errors import UserError
from distar.run import in_process
from distar.run.ema import GeneratorEMA, with_average
from distar.run.loop import RunLoop
from distar.run.validation import Validation
from exported import exported_unet, largest_difference

SMOKE = "jobs/configs/smoke.yaml"
# Large steps of the average, and an Adam eps that keeps weights with rounding-level gradients still
# (tests/test_cluster.py says why), so that runtimes summing in other orders agree to 1e-6.
ALIKE = ["optim.ema_decay=0.5", "optim.generator.eps=1e-5", "optim.fake_score.eps=1e-5"]


def moved_by(net: nn.Linear, amount: float):
    """An update that adds `amount` to the weight and reports a gradient norm of 1."""

    def update(loss):
        with torch.no_grad():
            net.weight.add_(amount)
        return 1.0

    return update


def test_the_average_follows_applied_updates_and_skips_the_others():
    net = nn.Linear(3, 2)
    net.bias.requires_grad_(False)  # frozen: not averaged
    w0, ema = net.weight.detach().clone(), GeneratorEMA(net, 0.9)
    step = with_average(moved_by(net, 1.0), ema)
    step(None), step(None)
    [average] = ema.average
    assert torch.allclose(average, 0.9 * (0.9 * w0 + 0.1 * (w0 + 1)) + 0.1 * (w0 + 2), atol=1e-6)  # float32 rounding near 0
    with_average(lambda loss: math.nan, ema)(None)  # a skipped update: the weights (w0 + 2) would have moved it
    assert torch.equal(ema.average[0], average)
    assert with_average(step, None) is step  # off: the update as it was


def test_applied_puts_the_averages_in_and_the_weights_back_even_after_an_error():
    net = nn.Linear(3, 2)
    ema = GeneratorEMA(net, 0.5)
    moved_by(net, 2.0)(None)
    ema.update()
    weights = net.weight.detach().clone()
    with pytest.raises(RuntimeError), ema.applied():
        assert torch.allclose(net.weight, weights - 1.0)  # halfway back to where it started
        raise RuntimeError("a validation that fails")
    assert torch.equal(net.weight, weights)


def test_a_saved_average_loads_back_and_a_missing_one_is_named(tmp_path):
    net = nn.Linear(3, 2)
    ema = GeneratorEMA(net, 0.5)
    moved_by(net, 2.0)(None)
    ema.update()
    ema.save(tmp_path, rank=1)
    fresh = GeneratorEMA(net, 0.5)
    fresh.load(tmp_path, rank=1)
    assert all(torch.equal(a, b) for a, b in zip(fresh.average, ema.average))
    with pytest.raises(UserError, match="holds no generator EMA for rank 0: the run that wrote it had optim.ema_decay off"):
        fresh.load(tmp_path, rank=0)


@pytest.mark.parametrize("decay", ["1", "1.5", "-0.1"])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        load_config(SMOKE, [f"optim.ema_decay={decay}"])


def test_the_model_card_says_which_weights_the_version_holds():
    from distar.tracking.registry import model_card

    assert "the exponential moving average of the generator's weights, decay 0.999" in model_card(load_config(SMOKE, ["optim.ema_decay=0.999"]), {}, 399)
    assert "Weights: the generator's own (no EMA)" in model_card(load_config(SMOKE), {}, 399)


# --------------------------------------------------------------------------- runs with the average on

def recording(runtime_class):
    """The runtime, noting the generator's weights before training and after every applied update."""

    class Recording(runtime_class):
        def updates(self, generator, fake, timing=None):
            update, fake_update = super().updates(generator, fake, timing)
            self.seen = [{k: v.detach().clone() for k, v in generator.unet.state_dict().items()}]

            def recorded(loss):
                norm = update(loss)
                if math.isfinite(norm):
                    self.seen.append({k: v.detach().clone() for k, v in generator.unet.state_dict().items()})
                return norm

            return recorded, fake_update

    return Recording


@pytest.mark.slow
def test_a_run_exports_and_validates_the_average_and_resumes_it_exactly(tmp_path):
    cfg = load_config(SMOKE, [*ALIKE, "run.steps=3", "run.validate_every=3", "data.validation_size=4", f"run.output_dir={tmp_path / 'whole'}"])
    lines, runtime = [], recording(in_process.InProcess)(cfg)
    loop = RunLoop(cfg, runtime, log=lines.append)
    loop.run()
    expected = runtime.seen[0]
    for weights in runtime.seen[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * weights[k] for k in expected}
    assert len(runtime.seen) == 4 and largest_difference(exported_unet(tmp_path / "whole"), expected) < 1e-6
    [last] = [line for line in lines if line.startswith("validation at step 3 ")]
    logged = dict(kv.split("=") for kv in last.partition(" | ")[2].split())  # printed to 4 significant digits
    loop.generator.unet.load_state_dict(exported_unet(tmp_path / "whole"))  # the exported weights, validated without the loop's EMA
    again = Validation(cfg, loop.parts, loop.latent_shape, loop.score_rewards)(loop.generator)
    assert float(logged["reward/pickscore"]) == pytest.approx(again["val/reward/pickscore"], rel=1e-3)

    halves = [*ALIKE, "run.checkpoint_every=2", f"run.output_dir={tmp_path / 'halves'}"]
    in_process.train(load_config(SMOKE, [*halves, "run.steps=2"]), log=lambda line: None)
    in_process.train(load_config(SMOKE, [*halves, "run.steps=3"]), log=lambda line: None)
    assert largest_difference(exported_unet(tmp_path / "halves"), exported_unet(tmp_path / "whole")) == 0  # one process: bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("persistence", [0, None])  # every parameter a partition, or the tiny UNet's all kept whole (the default)
def test_on_deepspeed_zero3_a_resumed_run_exports_the_one_process_average(deepspeed_here, tmp_path, monkeypatch, persistence):
    """The CPU twin of a Ray Train worker: the average of ZeRO-3's partitions (p.ds_tensor), of parameters
    it gathers at each use or keeps whole, written into a checkpoint with the engines and read back on resume."""
    from distar.cluster import engines

    if persistence is not None:
        monkeypatch.setattr(engines, "PERSISTENCE_THRESHOLD", persistence)
    sets = [*ALIKE, "data.batch_size=4", "run.checkpoint_every=2", "data.validation_size=0"]
    in_process.train(load_config(SMOKE, [*sets, "run.steps=3", f"run.output_dir={tmp_path / 'one'}"]), log=lambda line: None)
    for steps in (2, 3):
        cfg = load_config(SMOKE, [*sets, "cluster.zero_stage=3", f"run.steps={steps}", f"run.output_dir={tmp_path / 'zero3'}"])
        runtime = deepspeed_here(cfg)
        RunLoop(cfg, runtime, log=lambda line: None).run()
    assert (tmp_path / "zero3" / "checkpoints" / "checkpoint_000002" / "ema_rank0.pt").is_file()
    partitioned = [p for p in runtime.ema.params if not p.ds_persist]
    assert len(partitioned) == (len(runtime.ema.params) if persistence == 0 else 0)
    assert largest_difference(exported_unet(tmp_path / "zero3"), exported_unet(tmp_path / "one")) < 1e-6


@pytest.mark.slow
def test_across_two_ray_train_ranks_each_keeps_and_resumes_its_half_of_the_average(ray_cluster, jobs, tmp_path):
    """The shapes world's UNet has 15 parameters above ZeRO-3's persistence threshold: each of two
    ranks averages its half of them, checkpoints it and reads it back; the export is the average
    one process computes on the whole batch."""
    sets = [*ALIKE, "run.checkpoint_every=2", "data.validation_size=0"]
    in_process.train(load_config(None, [*sets, "data.batch_size=4", "run.steps=3", f"run.output_dir={tmp_path / 'one'}"]), log=lambda line: None)
    on_ray = [*sets, "data.batch_size=2", "cluster.trainer_workers=2", f"run.output_dir={tmp_path / 'two'}"]
    for steps in (2, 3):  # the second run resumes from the first one's checkpoint
        proc = jobs.run("train.py", *[a for s in [*on_ray, f"run.steps={steps}"] for a in ("--set", s)], env=ray_cluster.run_env)
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert "resuming from the checkpoint at step 2" in proc.stdout + proc.stderr
    assert largest_difference(exported_unet(tmp_path / "two"), exported_unet(tmp_path / "one")) < 1e-6
