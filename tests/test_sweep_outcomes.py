"""The sweep driver's bookkeeping, without Ray: how it reads its trials' ends back from the ledger
Tune's callback writes (a race inside a trial cannot mislabel its run), which folder it may
resume or take, and that concluding twice registers one version (a real MLflow store)."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from distar.config import load_config
from distar.errors import UserError
from distar.run import resume
from distar.sweep import results, runner
from distar.sweep.trial import PARENT_TAG, TRIAL_TAG
from distar.tracking import registry, store


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


def interrupted_sweep(folder, space_text: str, cfg) -> None:
    (folder / "tune").mkdir(parents=True)
    (folder / "tune" / "tuner.pkl").write_bytes(b"")  # what makes Tune's state restorable
    runner._record(folder, {"parent_run_id": "p1", "space": space_text, "config": cfg.model_dump(mode="json")})


def test_a_sweep_resumes_only_with_the_files_it_started_with(tmp_path):
    cfg = load_config("jobs/configs/smoke.yaml", [f"run.output_dir={tmp_path}"])
    interrupted_sweep(tmp_path, "parameters: {objective.alpha: {grid: [1, 2]}}\n", cfg)
    assert runner._earlier(tmp_path, cfg, "parameters: {objective.alpha: {grid: [1, 2]}}\n") == "p1"
    with pytest.raises(UserError, match=r"--space: .* holds an interrupted sweep of another space file"):
        runner._earlier(tmp_path, cfg, "parameters: {objective.alpha: {grid: [1, 3]}}\n")
    changed = load_config("jobs/configs/smoke.yaml", [f"run.output_dir={tmp_path}", "objective.cfg_scale=2.0"])
    with pytest.raises(UserError, match=r"base config trains differently: objective.cfg_scale \(.* in the checkpoint, 2.0 now\)"):
        runner._earlier(tmp_path, changed, "parameters: {objective.alpha: {grid: [1, 2]}}\n")


def test_sweeps_and_training_runs_do_not_share_a_folder(tmp_path):
    cfg = load_config("jobs/configs/smoke.yaml", [f"run.output_dir={tmp_path}"])
    checkpoint = tmp_path / "checkpoints" / "checkpoint_000004"
    checkpoint.mkdir(parents=True)
    resume.write_state(checkpoint, {"step": 4}, cfg)
    with pytest.raises(UserError, match="holds a training run's checkpoints; give the sweep another run.output_dir"):
        runner._earlier(tmp_path, cfg, "")
    swept = tmp_path / "swept"
    interrupted_sweep(swept, "", cfg)
    training_there = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(swept)})})
    with pytest.raises(UserError, match="holds a sweep; give this run another run.output_dir"), resume.claimed(training_there):
        pytest.fail("a training run claimed a sweep's folder")


def test_the_sweep_record_is_replaced_whole(tmp_path, monkeypatch):
    runner._record(tmp_path, {"parent_run_id": "p1"})
    real = Path.write_text

    def torn(path, text, *args, **kwargs):  # a crash halfway through the write
        real(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError):
        runner._record(tmp_path, {"parent_run_id": "p1", "finished": True})
    monkeypatch.undo()
    assert json.loads((tmp_path / runner.STATE_FILE).read_text()) == {"parent_run_id": "p1"}


def test_concluding_again_registers_no_second_candidate(tmp_path):
    where = store.resolve(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = store.connect(where, "sweeps")  # artifacts beside the database, not in the working directory
    client = where.client()
    with mlflow.start_run(experiment_id=experiment) as run:
        logged = mlflow.pyfunc.log_model(name="generator", python_model=str(Path(registry.__file__).with_name("pyfunc_code.py")))
    cfg = load_config("jobs/configs/smoke.yaml", ["tracking.registered_model=swept"])
    first = registry.register_logged(client, logged.model_uri, cfg)
    again = registry.register_logged(client, logged.model_uri, cfg)  # the sweep crashed before recording it was finished
    assert again.version == first.version and len(client.search_model_versions("name = 'swept'")) == 1
    assert client.get_model_version_by_alias("swept", "candidate").run_id == run.info.run_id


def test_trials_write_into_the_parent_runs_store_from_their_own_working_directory(tmp_path, monkeypatch):
    """Tune runs each trial in a directory of its own: without a store in the config, the default
    (./mlflow.db) must still mean the driver's database there, not a new one beside the trial."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    parent_uri = store.resolve(cfg.tracking.mlflow_uri).uri
    base = runner.trial_base(cfg, parent_uri)
    (tmp_path / "trial").mkdir()
    monkeypatch.chdir(tmp_path / "trial")
    assert store.resolve(base["tracking"]["mlflow_uri"]).uri == parent_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    named = load_config(None, ["tracking.mlflow_uri=http://127.0.0.1:5000"])
    assert runner.trial_base(named, parent_uri)["tracking"]["mlflow_uri"] == "http://127.0.0.1:5000"  # a named store stays as given
