"""How a sweep's driver reads its trials' ends back (no Ray: the ledger files Tune's callback
writes, and a real MLflow store), so a race inside a trial cannot mislabel its run."""

import json

from mlflow import MlflowClient

from distar.config import load_config
from distar.sweep import results, runner
from distar.sweep.trial import PARENT_TAG, TRIAL_TAG


def ledger(folder, trial_id: str, status: str, step: int) -> None:
    row = {"trial_id": trial_id, "status": status, "config": {"optim.generator.lr": 1e-8}, "last": {"step": step, "validations": 2}, "error": None}
    (folder / runner.ENDED_FILE).write_text(json.dumps(row) + "\n")
    (folder / runner.TRIALS_FILE).write_text(json.dumps([{**row, "status": "SEEN"}]))


def test_a_trial_the_scheduler_stopped_is_killed_even_if_it_recorded_its_exit_as_a_failure(tmp_path):
    # Tune stops a trial by raising SystemExit in its thread; the trial's own run may end FAILED
    # with that error before the actor is killed (seen as a flaky status in the full suite).
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("sweeps")
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={PARENT_TAG: parent, TRIAL_TAG: "t_0002"}).info.run_id
    client.set_tag(child, "distar.error", "SystemExit: 0")
    client.set_terminated(child, "FAILED")
    ledger(tmp_path, "t_0002", "TERMINATED", step=10)
    cfg = load_config("jobs/configs/smoke.yaml", ["run.steps=20"])
    [outcome] = runner._outcomes(tmp_path, cfg, client, parent)
    run = client.get_run(child)
    assert outcome.status == results.STOPPED and outcome.error is None
    assert run.info.status == "KILLED" and "distar.error" not in run.data.tags
    assert run.data.tags["distar.stopped"] == "stopped early by the scheduler at step 10 after 2 validations"


def test_a_finished_trial_is_left_as_it_ended(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("sweeps")
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={PARENT_TAG: parent, TRIAL_TAG: "t_0000"}).info.run_id
    client.set_terminated(child, "FINISHED")
    ledger(tmp_path, "t_0000", "TERMINATED", step=20)
    [outcome] = runner._outcomes(tmp_path, load_config("jobs/configs/smoke.yaml", ["run.steps=20"]), client, parent)
    assert outcome.status == results.COMPLETED and client.get_run(child).info.status == "FINISHED"
