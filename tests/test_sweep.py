"""A real sweep: jobs/sweep.py on the test cluster with a real MLflow server. Four short toy
trials over the generator learning rate, two at a time, sharing one set of pools:

    trial 0: lr 1e-4   learns
    trial 1: lr 2e-4   learns faster: whichever of the two reports its first validation first,
                       it goes on (ASHA may stop the slower learner when it reports second)
    trial 2: lr 1e-8   does not move: clearly worse at the first validation, so ASHA stops it
    trial 3: lr 1e30   blows up: non-finite updates stop the run, the trial fails

Grid search keeps that order, so both learners have set ASHA's cutoff before the bad ones report.
"""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

LRS = [1e-4, 2e-4, 1e-8, 1e30]
pytestmark = pytest.mark.slow


def sweep_args(out: Path, uri: str, space: dict, folder: Path) -> list[str]:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    settings = [f"run.output_dir={out}", "run.name=lr-sweep", "run.steps=20", "run.validate_every=10", "run.log_every=10",
                "run.max_consecutive_skips=3", "data.batch_size=4", f"tracking.mlflow_uri={uri}", "tracking.experiment=sweeps",
                "tracking.registered_model=swept", "tracking.grid_every=10"]
    return ["--space", str(path), *(a for s in settings for a in ("--set", s))]


@pytest.fixture(scope="module")
def swept(ray_cluster, mlflow_server, tmp_path_factory, jobs, mlflow_client):
    folder = tmp_path_factory.mktemp("sweep")
    space = {"search": {"algorithm": "grid", "max_concurrent": 2},
             "scheduler": {"kind": "asha", "metric": "val/pref", "mode": "max", "grace_period": 1, "reduction_factor": 2},
             "parameters": {"optim.generator.lr": {"grid": LRS}}}
    out = folder / "out"
    proc = jobs.run("sweep.py", *sweep_args(out, mlflow_server.uri, space, folder), env=ray_cluster.run_env, timeout=1200)
    client = mlflow_client(mlflow_server.uri)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return proc, out, client, runs


def _children(runs):
    [parent] = [r for r in runs if r.data.tags.get("distar.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_lr = {float(r.data.params["optim.generator.lr"]): r for r in children}
    return parent, children, by_lr


def test_a_sweep_tracks_one_parent_and_a_child_per_trial(swept):
    proc, out, client, runs = swept
    assert proc.returncode == 0, proc.stderr[-4000:]
    parent, children, by_lr = _children(runs)
    assert parent.info.status == "FINISHED" and len(runs) == 5
    assert sorted(by_lr) == sorted(LRS) and len(children) == 4  # one child per trial, each with its own value
    assert {r.data.tags["distar.kind"] for r in children} == {"trial"}
    # Children are training runs like any other: per-step metrics, validations, grids.
    learner = by_lr[2e-4]
    assert learner.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(learner.info.run_id, "val/pref")] == [0, 10, 20]
    assert len(client.get_metric_history(learner.info.run_id, "reward/pickscore")) == 20
    assert any(a.path.startswith("images") for a in client.list_artifacts(learner.info.run_id))


def test_the_sweep_leaves_a_table_a_pareto_plot_and_one_candidate(swept):
    proc, out, client, runs = swept
    parent, children, by_lr = _children(runs)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.csv", "pareto.png", "space.yaml", "config.yaml"} <= artifacts
    table = (out / "results.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ") and "_0000" in line]) == 4
    plot = np.asarray(Image.open(out / "pareto.png"))
    assert plot.shape[0] > 300 and plot.std() > 0  # a drawn figure, not an empty canvas
    # The selection rule: the best final val/pref among trials that completed.
    completed = {lr: r for lr, r in by_lr.items() if r.info.status == "FINISHED"}
    final = {lr: client.get_metric_history(r.info.run_id, "val/pref")[-1].value for lr, r in completed.items()}
    best = max(final, key=final.get)
    [version] = client.search_model_versions("name = 'swept'")
    assert version.run_id == completed[best].info.run_id
    assert client.get_model_version_by_alias("swept", "candidate").version == version.version
    assert parent.data.tags["distar.selected_trial"] == completed[best].data.tags["distar.trial_id"]
    assert f"registered swept version {version.version} (alias candidate)" in proc.stdout


def test_asha_stops_the_clearly_worse_trial_early(swept):
    proc, out, client, runs = swept
    _, _, by_lr = _children(runs)
    stalled = by_lr[1e-8]
    assert stalled.info.status == "KILLED" and "stopped early by the scheduler at step 10" in stalled.data.tags["distar.stopped"]
    assert max(m.step for m in client.get_metric_history(stalled.info.run_id, "reward/pickscore")) == 10  # sent with the validation
    assert client.search_model_versions(f"run_id = '{stalled.info.run_id}'") == []
    assert "| stopped early |" in (out / "results.md").read_text()


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(swept):
    proc, out, client, runs = swept
    _, _, by_lr = _children(runs)
    failed = by_lr[1e30]
    assert failed.info.status == "FAILED" and "run stopped at step 4" in failed.data.tags["distar.error"]
    assert by_lr[2e-4].info.status == "FINISHED" and by_lr[1e-4].info.status in ("FINISHED", "KILLED")  # the others went on
    assert "| failed |" in (out / "results.md").read_text()


def test_bad_input_exits_2_before_anything_starts(tmp_path, jobs):
    bad_space = {"parameters": {"objective.alfa": {"uniform": [0.5, 2.0]}}, "scheduler": {"metric": "val/pref"}}
    proc = jobs.run("sweep.py", *sweep_args(tmp_path / "out", "sqlite:///unused.db", bad_space, tmp_path), timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "space error: parameters.objective.alfa: no such field in the run config; did you mean objective.alpha?"
    assert not (tmp_path / "out").exists()


def test_an_interrupted_sweep_resumes_into_the_same_runs(ray_cluster, mlflow_server, tmp_path, jobs, mlflow_client):
    """SIGTERM (as `ray job stop` or a scheduler sends it; it takes Ctrl-C's path) while the second
    of two trials runs; the same command finishes the sweep without redoing the first trial, in
    the same parent run."""
    space = {"search": {"algorithm": "grid", "max_concurrent": 1}, "scheduler": {"kind": "fifo", "metric": "val/pref"},
             "parameters": {"optim.generator.lr": {"grid": [1e-4, 2e-4]}}}
    args = [*sweep_args(tmp_path / "out", mlflow_server.uri, space, tmp_path), "--set", "tracking.experiment=resumed", "--set", "run.checkpoint_every=5"]
    client = mlflow_client(mlflow_server.uri)

    def runs():
        experiment = client.get_experiment_by_name("resumed")
        return client.search_runs([experiment.experiment_id]) if experiment else []

    proc = jobs.start("sweep.py", *args, env=ray_cluster.run_env)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        trials = [r for r in runs() if r.data.tags.get("distar.kind") == "trial"]
        if any(r.info.status == "FINISHED" for r in trials) and len(trials) == 2:  # the first done, the second started
            break
        time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, log[-4000:]
    assert log.strip().splitlines()[-1].startswith("terminated: "), log[-4000:]
    [parent] = [r for r in runs() if r.data.tags.get("distar.kind") == "sweep"]
    assert parent.info.status == "KILLED"
    first = next(r for r in runs() if r.data.tags.get("distar.kind") == "trial" and r.info.status == "FINISHED")

    again = jobs.run("sweep.py", *args, env=ray_cluster.run_env, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    finished = runs()
    [parent_again] = [r for r in finished if r.data.tags.get("distar.kind") == "sweep"]
    trials = [r for r in finished if r.data.tags.get("distar.kind") == "trial"]
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    steps = [m.step for m in client.get_metric_history(first.info.run_id, "reward/pickscore")]
    assert steps == list(range(1, 21))  # the finished trial was not run again
    done = jobs.run("sweep.py", *args, env=ray_cluster.run_env, timeout=300)
    assert done.returncode == 2 and "holds a finished sweep" in done.stderr.strip().splitlines()[-1]  # nothing registered twice
