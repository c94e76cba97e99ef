"""Training jobs on the session's Ray cluster, as the cluster and fault tests start, watch and
stop them: the job's arguments, its progress on disk, its replicas, its MLflow run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "jobs/configs/smoke.yaml"


def train_args(out: Path, *sets: str) -> list[str]:
    return ["--config", SMOKE, "--set", f"run.output_dir={out}", *[a for s in sets for a in ("--set", s)]]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("checkpoint_*") if p.is_dir())


def last_state(out: Path) -> dict:
    return json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())


def wait_for_step(out: Path, step: int, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-5000:]
        if (out / "metrics.jsonl").is_file() and any(m["step"] >= step for m in metrics(out)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the run did not reach step {step} in {timeout} s")


def wait_for_registered_checkpoint(out: Path, step: int, proc, timeout=120) -> None:
    snapshot, deadline = out / "checkpoints" / "checkpoint_manager_snapshot.json", time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-5000:]
        if snapshot.is_file() and any(c["metrics"]["step"] >= step for c in json.loads(snapshot.read_text())["checkpoint_results"]):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint at step {step} registered in {timeout} s")


@pytest.fixture
def start(jobs, ray_cluster):
    """`start(out, steps, *sets)`: a training job in the background; ended if the test leaves it running."""
    started = []

    def start_job(out: Path, steps: int, *sets: str):
        started.append(jobs.start("train.py", *train_args(out, f"run.steps={steps}", "run.checkpoint_every=3", *sets), env=ray_cluster.run_env))
        return started[-1]

    yield start_job
    for proc in started:  # SIGTERM first: the job then shuts its pools down, which the next test counts
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def finish(proc, timeout=600) -> str:
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, log[-5000:]
    return log


def in_driver(cluster, code: str) -> None:
    """Run `code` in a driver of its own against the cluster (ray, list_actors and os in scope)."""
    script = f"import os, signal, ray\nfrom ray.util.state import list_actors\nray.init(address='{cluster.address}')\n{code}\n"
    subprocess.run([sys.executable, "-c", script], env=cluster.env, check=True, timeout=120, capture_output=True)


def replicas(cluster, out: Path) -> list[str]:
    """Names of the Serve replicas of the run writing to `out` (its app names carry the run name)."""
    script = (f"import ray\nray.init(address='{cluster.address}')\n"
              "print('\\n'.join(a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if a['name'].startswith('SERVE_REPLICA::distar-')))")
    proc = subprocess.run([sys.executable, "-c", script], env=cluster.env, check=True, timeout=120, capture_output=True, text=True)
    return [line for line in proc.stdout.splitlines() if line]


def ray_cli(cmd: list[str], cluster) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def tracked(mlflow_client, out: Path):
    """The MLflow run of the training run writing to `out` (the cluster's store)."""
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`distar.output_dir` = '{out.resolve()}'")
    return run
