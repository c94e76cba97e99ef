"""The run loop in one process: checkpoints and resume with the semantics of a run on Ray (the
same folder resumes, the next steps' losses are an uninterrupted run's), and the stop rule as
the loop's result, not a metric."""

import json

import pytest
import torch

from distar.config import load_config
from distar.errors import RunFailed, UserError
from distar.run import in_process
from distar.run.runtime import Outcome
from distar.run.timing import STEP_PARTS

SMOKE = "jobs/configs/smoke.yaml"


def train(out, *sets):
    cfg = load_config(SMOKE, [f"run.output_dir={out}", *sets])
    return in_process.train(cfg, log=lambda line: None)


def history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def unet_params(folder) -> torch.Tensor:
    from diffusers import UNet2DConditionModel

    return torch.cat([p.detach().flatten() for p in UNet2DConditionModel.from_pretrained(folder, subfolder="unet").parameters()])


@pytest.mark.slow
def test_a_run_started_again_resumes_from_its_last_checkpoint(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(whole, "run.steps=4", "run.checkpoint_every=2")
    first = train(halves, "run.steps=2", "run.checkpoint_every=2")
    assert first == Outcome(2, generator=halves / "generator")
    second = train(halves, "run.steps=4", "run.checkpoint_every=2")
    assert second.step == 4 and second.exported() == halves / "generator"
    a, b = history(whole), history(halves)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m in a:  # each step's time by part, wall and CPU, of listed parts only
        timed = {k.split("/", 1)[1] for k in m if k.startswith(("time/", "cpu/"))}
        assert {"generator_forward", "fake_forward", "reward", "reference", "generator_update"} <= timed <= set(STEP_PARTS)
    for m_whole, m_resumed in zip(a, b):
        for key in ("loss/generator", "loss/fake_score", "divergence", "reward/pickscore"):
            assert m_resumed[key] == m_whole[key], key  # the same process, the same arithmetic: bit for bit
    assert torch.equal(unet_params(whole / "generator"), unet_params(halves / "generator"))
    assert sorted(p.name for p in (halves / "checkpoints").iterdir()) == ["checkpoint_000002", "checkpoint_000004"]
    again = train(halves, "run.steps=6", "run.checkpoint_every=2")
    assert again.step == 6 and sorted(p.name for p in (halves / "checkpoints").iterdir()) == ["checkpoint_000004", "checkpoint_000006"]


@pytest.mark.slow
def test_the_stop_rule_is_the_runs_outcome(tmp_path):
    """A generator learning rate of 1e30 blows the weights up at the first update; the next three
    are skipped and the loop ends the run, saying why, with no export and no checkpoint of the
    diverged state."""
    out = tmp_path / "run"
    outcome = train(out, "run.steps=20", "optim.generator.lr=1e30", "run.max_consecutive_skips=3")
    assert outcome.step == 4 and outcome.generator is None
    assert outcome.stopped.startswith("3 updates in a row had a non-finite loss, reward or gradient")
    with pytest.raises(RunFailed, match="run stopped at step 4: 3 updates in a row"):
        outcome.exported()
    steps = history(out)
    assert [m["skipped"] for m in steps] == [0, 1, 1, 1] and all("stopped" not in m for m in steps)  # telemetry stays telemetry
    assert not (out / "generator").exists()
    assert not list((out / "checkpoints").glob("checkpoint_*"))


@pytest.mark.slow
def test_a_diverged_run_started_again_keeps_its_checkpoints(tmp_path):
    """Started again, it replays from its last checkpoint and stops at the same step; the stop
    writes nothing, so no good checkpoint is evicted however often that happens."""
    out, sets = tmp_path / "run", ("run.steps=20", "optim.generator.lr=1e30", "run.max_consecutive_skips=3", "run.checkpoint_every=1")
    first = train(out, *sets)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert first.step == 4 and kept == ["checkpoint_000002", "checkpoint_000003"]
    for _ in range(2):
        again = train(out, *sets)
        assert (again.step, again.stopped) == (first.step, first.stopped)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def test_an_in_process_run_refuses_a_folder_of_ray_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint_manager_snapshot.json").write_text("{}")
    runtime = in_process.InProcess(load_config(SMOKE, [f"run.output_dir={tmp_path}"]))
    with pytest.raises(UserError, match="holds the checkpoints of a run on Ray; resume it on Ray"):
        runtime.restore()


def test_a_run_on_ray_refuses_a_folder_of_in_process_checkpoints(tmp_path):
    from distar.cluster.launch import fit

    checkpoint = tmp_path / "checkpoints" / "checkpoint_000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / in_process.STATE_FILE).write_text("{}")
    with pytest.raises(UserError, match="holds the checkpoints of an in-process run; resume it with --in-process"):
        fit(load_config(SMOKE, [f"run.output_dir={tmp_path}"]), pools=None, tracking=None)


@pytest.mark.slow
def test_steps_replayed_after_a_restart_are_recorded_once(tmp_path):
    """A worker that dies after its last checkpoint is restarted from it and replays the steps
    since; the metrics file and the MLflow run get each step once."""
    import shutil

    from distar.tracking.runs import TrainingRun

    out = tmp_path / "run"
    cfg = load_config(SMOKE, [f"run.output_dir={out}", "run.checkpoint_every=2", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db"])
    with TrainingRun(cfg) as tracked:
        in_process.train(cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": 3})}), tracked.target, log=lambda line: None)
        shutil.rmtree(out / "checkpoints" / "checkpoint_000003")  # died after step 3, before that checkpoint was kept
        in_process.train(cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": 4})}), tracked.target, log=lambda line: None)
        logged = tracked.client.get_metric_history(tracked.run_id, "loss/generator")
    assert [m["step"] for m in history(out)] == [1, 2, 3, 4]
    assert sorted(m.step for m in logged) == [1, 2, 3, 4]
