"""The guard against reward hacking (run.guard): its rule on validation values, and runs it
stops or rolls back, in one process, on DeepSpeed engines and on a Ray cluster, exporting the
kept generator."""

import json
import math
import os
import re

import pytest
import torch

from distar.config import GuardSection, load_config
from distar.run.guard import Guard
from distar.run.in_process import run_loop
from distar.run.loop import RunLoop
from distar.run.validation import Validation
from exported import exported_unet, largest_difference

REWARDS = load_config().rewards  # pickscore (weight 1) and clip_score (weight 0.1): the training reward is their weighted sum
SPEC = GuardSection(enabled=True, judges={"world/misplaced": 0.02, "acc/all": 0.1}, patience=2)


def values(pickscore: float, misplaced: float, acc: float = 0.5) -> dict[str, float]:
    return {"val/reward/pickscore": pickscore, "val/reward/clip_score": 0.0, "val/world/misplaced": misplaced, "val/acc/all": acc}


def test_the_kept_generator_is_the_best_rewarded_one_whose_judges_have_not_fallen():
    guard = Guard(SPEC, REWARDS)
    assert guard.observe(0, values(1.0, 0.10)).keep  # the untrained generator: kept by definition
    assert guard.observe(100, values(2.0, 0.11)).keep  # misplaced worse by 0.01, inside its margin
    assert not guard.observe(200, values(1.5, 0.10)).keep  # healthy, but less reward than the kept one
    assert guard.observe(300, values(2.5, 0.09, acc=0.45)).keep  # acc/all down 0.05 < 0.1
    assert guard.state.kept_step == 300 and guard.state.kept_reward == pytest.approx(2.5)
    assert guard.state.best == pytest.approx({"world/misplaced": -0.09, "acc/all": 0.5})  # signed: higher is better


def test_the_reward_rising_while_a_judge_falls_trips_it_after_patience_validations():
    guard = Guard(SPEC, REWARDS)
    guard.observe(0, values(1.0, 0.10))
    first = guard.observe(100, values(3.0, 0.15))  # misplaced 0.05 above its best: fallen, with the reward up
    assert (first.keep, first.action) == (False, None) and guard.state.strikes == 1
    tripped = guard.observe(200, values(4.0, 0.20))
    assert (tripped.keep, tripped.action) == (False, "stop")
    assert tripped.reason.startswith("at step 200 the training reward 4 was above the kept generator's 1 (step 0) while world/misplaced 0.2")
    assert tripped.reason.endswith("stopped with the generator of step 0") and guard.state.trips == [tripped.reason]


def test_a_judge_falling_with_the_reward_is_no_strike_and_a_healthy_validation_ends_a_run_of_strikes():
    guard = Guard(SPEC, REWARDS)
    guard.observe(0, values(2.0, 0.10))
    assert guard.observe(100, values(1.0, 0.30)).action is None and guard.state.strikes == 0  # worse everywhere: not hacking
    guard.observe(200, values(3.0, 0.30))
    assert guard.state.strikes == 1
    guard.observe(300, values(2.5, 0.10))  # healthy but below the kept reward: not kept, strikes end
    assert guard.state.strikes == 0 and guard.observe(400, values(3.0, 0.30)).action is None


def test_a_non_finite_judge_has_fallen():
    guard = Guard(SPEC, REWARDS)
    guard.observe(0, values(1.0, 0.10))
    assert not guard.observe(100, values(2.0, math.nan)).keep and guard.state.strikes == 1


def test_rollbacks_end_in_a_stop_after_max_rollbacks():
    guard = Guard(GuardSection(enabled=True, judges={"acc/all": 0.1}, patience=1, action="rollback", max_rollbacks=2), REWARDS)
    guard.observe(0, values(1.0, 0.1, acc=0.8))
    actions = [guard.observe(step, values(2.0, 0.1, acc=0.2)).action for step in (100, 200, 300)]
    assert actions == ["rollback", "rollback", "stop"]
    assert guard.state.trips[0].endswith("rolled back to step 0 (rollback 1 of 2)")


def test_the_guard_state_travels_in_a_checkpoint():
    """Saved with the progress (JSON) and read back, it decides as the guard that never stopped."""
    sequence = [values(1.0, 0.1), values(2.0, 0.2), values(3.0, 0.3), values(4.0, 0.4)]
    straight = Guard(SPEC, REWARDS)
    verdicts = [straight.observe(i, v) for i, v in enumerate(sequence)]
    resumed = Guard(SPEC, REWARDS)
    resumed.observe(0, sequence[0])
    resumed = Guard(SPEC, REWARDS, json.loads(json.dumps(resumed.saved())))
    assert [resumed.observe(i, v) for i, v in enumerate(sequence[1:], 1)] == verdicts[1:]


# --------------------------------------------------------------------------- runs the guard watches

HACKING = ["objective.alpha=0", "optim.generator.lr=1e-3", "run.steps=40", "run.validate_every=5", "data.batch_size=4",
           "data.validation_size=16", "run.log_every=100", "run.guard.enabled=true", "run.guard.judges={world/misplaced: 0.02}"]


def keeping(runtime_class):
    """The runtime, noting the generator's weights at each snapshot (what the run must export)."""

    class Keeping(runtime_class):
        def updates(self, generator, fake, timing=None):
            self.generator = generator
            return super().updates(generator, fake, timing)

        def snapshot(self):
            super().snapshot()
            with self.gathered(self.generator):
                self.kept = {k: v.detach().clone() for k, v in self.generator.unet.state_dict().items()}

    return Keeping


@pytest.mark.slow
def test_a_hacking_run_is_stopped_and_exports_the_kept_generator(tmp_path, mlflow_client):
    """Rewards alone at a high learning rate: the reader's faithfulness check sees the images leave
    the world while the reward climbs. The run stops, exports the kept generator and says why in MLflow."""
    from distar.run.in_process import InProcess
    from distar.tracking.runs import TrainingRun

    cfg = load_config(None, [*HACKING, f"run.output_dir={tmp_path}", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db"])
    lines, runtime = [], keeping(InProcess)(cfg)
    with TrainingRun(cfg) as tracked:
        outcome = RunLoop(cfg, runtime, log=lines.append).run(tracked.target)
        tracked.finish()
    tripped = [line for line in lines if line.startswith("guard: ")]
    assert len(tripped) == 1 and "stopped with the generator of step" in tripped[0], lines
    kept_step = int(tripped[0].rsplit(" ", 1)[1])
    assert outcome.step < 40 and outcome.generator is not None and outcome.guard.startswith(f"kept the generator of step {kept_step} ")
    assert outcome.generator == tmp_path / "generator" and largest_difference(exported_unet(tmp_path), runtime.kept) == 0
    tag = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db").get_run(tracked.run_id).data.tags["distar.guard"]
    assert tag == outcome.guard and tripped[0].removeprefix("guard: ") in tag


@pytest.mark.slow
def test_on_deepspeed_zero3_a_rollback_reloads_the_kept_state_and_the_end_exports_it(deepspeed_here, tmp_path):
    """The Ray runtime's engine snapshot (DeepSpeed's own checkpoint, every rank's shards) on one
    gloo rank: rolled back once, stopped the second time; the export is the kept generator's."""
    cfg = load_config(None, [*HACKING, f"run.output_dir={tmp_path}", "cluster.zero_stage=3", "run.guard.action=rollback",
                             "run.guard.max_rollbacks=1", "run.guard.patience=1"])
    lines, runtime = [], keeping(deepspeed_here)(cfg)
    outcome = RunLoop(cfg, runtime, log=lines.append).run()
    tripped = [line for line in lines if line.startswith("guard: ")]
    assert "rolled back to step" in tripped[0] and "stopped with the generator of step" in tripped[1], lines
    assert outcome.generator == tmp_path / "generator" and largest_difference(exported_unet(tmp_path), runtime.kept) == 0
    assert all(torch.isfinite(v).all() for v in runtime.kept.values())  # ZeRO-3 gathers under gloo: no NaN crept in


@pytest.mark.slow
def test_on_a_ray_cluster_two_zero3_ranks_roll_back_and_export_the_kept_generator(ray_cluster, jobs, mlflow_client, tmp_path):
    """Ray Train workers with ZeRO-3 across two ranks (2 prompts each: the runs above' batch of 4)
    snapshot and rewind their shards on rank 0's word. The exported generator, validated again in
    this process, gives the values the run logged for the kept step, and it alone is registered."""
    from cluster_runs import tracked

    out = tmp_path / "run"
    sets = [*HACKING, "data.batch_size=2", "cluster.trainer_workers=2", f"run.output_dir={out}", "run.guard.action=rollback",
            "run.guard.max_rollbacks=1", "run.guard.patience=1"]
    proc = jobs.run("train.py", *[a for s in sets for a in ("--set", s)], env=ray_cluster.run_env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    tripped = re.findall(r"guard: (at step .*)", proc.stdout + proc.stderr)  # rank 0's trips, not the job's closing note
    assert len(tripped) == 2 and "rolled back to step" in tripped[0] and "stopped with the generator of step" in tripped[1], tripped
    run = tracked(mlflow_client, out)
    kept_step = int(re.match(r"kept the generator of step (\d+) ", run.data.tags["distar.guard"]).group(1))
    assert tripped[1].endswith(f"step {kept_step}")
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    assert len(client.search_model_versions(f"run_id = '{run.info.run_id}'")) == 1

    cfg = load_config(None, sets)
    loop = run_loop(cfg, log=lambda line: None)
    weights = exported_unet(out)
    assert all(torch.isfinite(v).all() for v in weights.values())
    loop.generator.unet.load_state_dict(weights)
    again = Validation(cfg, loop.parts, loop.latent_shape, loop.score_rewards)(loop.generator)
    for name in ("val/reward/pickscore", "val/pref", "val/world/misplaced"):
        [logged] = [m.value for m in client.get_metric_history(run.info.run_id, name) if m.step == kept_step]
        assert again[name] == pytest.approx(logged, rel=1e-4, abs=1e-6), name
