"""Faults and stops of a training run on a real Ray cluster: a replica or a trainer worker
killed mid-run, a pool lost for good, Ctrl-C, SIGTERM and `ray job stop`."""

import json
import re
import signal
import time

import pytest

from cluster_runs import finish, in_driver, last_state, metrics, ray_cli, replicas, tracked, train_args, wait_for_registered_checkpoint, wait_for_step

pytestmark = pytest.mark.slow


def test_a_reward_replica_then_a_trainer_worker_killed_mid_run(ray_cluster, start, tmp_path):
    """One run takes both faults: a reward replica killed at step 3 (Serve replaces it; the trainer
    sends its request again) and the trainer worker killed after the checkpoint at step 6 (Ray
    Train restarts it from that checkpoint). No step is lost or recorded twice."""
    out, steps = tmp_path / "run", 12
    proc = start(out, steps)
    wait_for_step(out, 3, proc)
    in_driver(ray_cluster, "names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if '-rewards#RewardPool#' in a['name']]\n"
                           "assert len(names) == 1, names\n"
                           "ray.kill(ray.get_actor(names[0], namespace='serve'), no_restart=True)")
    wait_for_step(out, 7, proc)
    wait_for_registered_checkpoint(out, 6, proc)  # the controller resumes only from checkpoints it has registered
    in_driver(ray_cluster, "(w,) = list_actors(filters=[('class_name', '=', 'RayTrainWorker'), ('state', '=', 'ALIVE')])\n"
                           "os.kill(w.pid, signal.SIGKILL)")
    log = finish(proc)
    assert "resuming from the checkpoint at step" in log
    history = metrics(out)
    final = last_state(out)
    assert final["step"] == steps and final["applied"] == steps
    # Steps after the checkpoint were redone from it and recorded once.
    assert [m["step"] for m in history] == list(range(1, steps + 1))


def test_a_pool_lost_for_good_ends_the_run_in_one_line(ray_cluster, start, mlflow_client, tmp_path):
    out = tmp_path / "run"
    proc = start(out, 200, "run.name=poollost", "cluster.max_failures=0", "cluster.reward_pool.request_timeout_s=5")
    wait_for_step(out, 2, proc)
    in_driver(ray_cluster, "from ray import serve\n[serve.delete(n) for n in serve.status().applications if n.startswith('distar-poollost-') and n.endswith('-rewards')]")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("error: reward pool: a request failed 5 times; last error: "), log[-3000:]
    run = tracked(mlflow_client, out)
    assert run.info.status == "FAILED" and run.data.tags["distar.error"].startswith("PoolUnavailable: reward pool: a request failed")
    assert replicas(ray_cluster, out) == []  # the reference pool too


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_shut_the_pools_down(ray_cluster, start, tmp_path, mlflow_client, sig, status, word):
    out = tmp_path / "run"
    proc = start(out, steps=200)
    wait_for_step(out, 2, proc)
    assert len(replicas(ray_cluster, out)) == 2  # one reward and one reference replica
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, log[-3000:]
    assert log.strip().splitlines()[-1] == f"{word}: pools shut down; the run resumes from its last checkpoint when started again"
    assert replicas(ray_cluster, out) == []
    assert tracked(mlflow_client, out).info.status == "KILLED"


def test_ray_job_stop_ends_the_run_killed_and_frees_the_pools(ray_cluster, mlflow_client, tmp_path):
    out = tmp_path / "run"
    ray = ["ray", "job"]
    wait = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})  # SIGTERM, then SIGKILL after this long (Ray's default: 3 s)
    submit = [*ray, "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--no-wait", "--runtime-env-json", wait, "--",
              "python", "jobs/train.py", *train_args(out, "run.steps=200", "run.checkpoint_every=3")]
    job = re.search(r"Job '(\S+)' submitted successfully", ray_cli(submit, ray_cluster).stdout).group(1)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and metrics(out)) and time.time() < deadline:
        time.sleep(1)
    assert len(replicas(ray_cluster, out)) == 2, ray_cli([*ray, "logs", "--address", ray_cluster.dashboard, job], ray_cluster).stdout[-3000:]
    ray_cli([*ray, "stop", "--address", ray_cluster.dashboard, job], ray_cluster)  # waits for the job to end
    assert f"Job '{job}' was stopped" in ray_cli([*ray, "status", "--address", ray_cluster.dashboard, job], ray_cluster).stdout
    logs = ray_cli([*ray, "logs", "--address", ray_cluster.dashboard, job], ray_cluster).stdout
    assert "terminated: pools shut down" in logs, logs[-3000:]
    assert replicas(ray_cluster, out) == []
    run = tracked(mlflow_client, out)
    assert run.info.status == "KILLED" and run.data.tags["ray.job_id"] == job
