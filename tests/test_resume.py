"""An output folder belongs to one run: a run that trains differently does not resume from its
checkpoints (unless told to start over), and two runs never write it at once."""

import json
import os
from pathlib import Path

import pytest

from distar.config import load_config
from distar.run.resume import LOCK_FILE, ResumeError, claimed, differences, write_state

SMOKE = "jobs/configs/smoke.yaml"


def config(out, *sets):
    return load_config(SMOKE, [f"run.output_dir={out}", *sets])


def claim(cfg, restart: bool = False) -> None:
    """Start a run on cfg's folder and end it at once: what the train job does before and after training."""
    with claimed(cfg, restart):
        assert f"pid {os.getpid()}" in (Path(cfg.run.output_dir) / LOCK_FILE).read_text()  # held, and by whom


def checkpoint(out, step: int, cfg) -> None:
    folder = out / "checkpoints" / f"checkpoint_{step:06d}"
    folder.mkdir(parents=True)
    write_state(folder, {"step": step}, cfg)


def test_only_fields_that_shape_training_count(tmp_path):
    stored = config(tmp_path).model_dump(mode="json")
    same = config(tmp_path / "elsewhere", "run.steps=9999", "run.name=other", "tracking.experiment=x", "cluster.reward_pool.replicas=3",
                  "run.checkpoint_every=7", "data.validation_size=4", "cluster.zero_stage=2")
    assert differences(stored, same) == []
    changed = config(tmp_path, "objective.divergence=kl", "optim.generator.lr=3e-4", "cluster.trainer_workers=2")
    assert differences(stored, changed) == [
        "objective.divergence ('score' in the checkpoint, 'kl' now)", "optim.generator.lr (0.0001 in the checkpoint, 0.0003 now)",
        "cluster.trainer_workers (1 in the checkpoint, 2 now)"]


def test_a_run_that_trains_differently_is_refused_naming_the_fields(tmp_path):
    checkpoint(tmp_path, 2, config(tmp_path))
    checkpoint(tmp_path, 4, config(tmp_path, "optim.generator.lr=3e-4"))  # the newest decides
    claim(config(tmp_path, "optim.generator.lr=3e-4", "run.steps=10"))
    with pytest.raises(ResumeError) as e:
        claim(config(tmp_path, "objective.divergence=kl"))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"error: run.output_dir: {tmp_path}/checkpoints holds a checkpoint at step 4 ")
    assert "objective.divergence ('score' in the checkpoint, 'kl' now); optim.generator.lr (0.0003 in the checkpoint, 0.0001 now)" in message
    assert message.endswith("or start over with --restart (deletes those checkpoints)")


def test_restart_deletes_the_checkpoints_and_metrics(tmp_path):
    checkpoint(tmp_path, 2, config(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with claimed(config(tmp_path, "objective.divergence=kl"), restart=True):
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_two_runs_never_share_a_folder_at_once(tmp_path):
    with claimed(config(tmp_path)):
        with pytest.raises(ResumeError, match=rf"run.output_dir: {tmp_path} is in use by another run \(pid \d+\)"):
            claim(config(tmp_path))
    claim(config(tmp_path))  # released when the first run ended


@pytest.mark.slow
def test_the_job_refuses_a_changed_run_and_restarts_when_told(jobs, tmp_path, mlflow_client):
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    base = ["--in-process", "--config", SMOKE, "--set", f"run.output_dir={out}", "--set", f"tracking.mlflow_uri={uri}"]
    assert jobs.run("train.py", *base, "--set", "run.steps=2").returncode == 0
    refused = jobs.run("train.py", *base, "--set", "run.steps=4", "--set", "objective.divergence=kl")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: run.output_dir: ")
    assert len(mlflow_client(uri).search_model_versions("name = 'distar-generator'")) == 1  # nothing registered for it
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    restarted = jobs.run("train.py", *base, "--set", "run.steps=3", "--set", "objective.divergence=kl", "--restart")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "resuming" not in restarted.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    resumed = jobs.run("train.py", *base, "--set", "run.steps=5", "--set", "objective.divergence=kl")
    assert resumed.returncode == 0 and "resuming from the checkpoint at step 3" in resumed.stdout
