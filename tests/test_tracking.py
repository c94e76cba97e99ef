"""Every training run lands in MLflow: params, tags, per-step metrics, grids, the config and a
registered pyfunc generator with alias `candidate`; against a real `mlflow server` and in the
embedded default store; secrets never reach what is logged."""

import io
import os
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from distar.config import load_config
from distar.tracking import store
from distar.tracking.runs import flat_params
from distar.tracking.store import safe_tree

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cr3t"


def test_secrets_are_redacted_from_params_and_config():
    cfg = load_config(None, [f"tracking.mlflow_uri=https://alice:{SECRET}@mlflow.example.com",
                             f"model.reference=https://host/model?X-Amz-Signature={SECRET}&x=1"])
    params = flat_params(cfg.model_dump(mode="json"))
    assert params["tracking.mlflow_uri"] == "https://***@mlflow.example.com"
    assert params["model.reference"] == "https://host/model?X-Amz-Signature=***&x=1"
    assert params["objective.alpha"] == "1.0" and params["rewards.1.name"] == "clip_score"
    assert SECRET not in repr(params) and SECRET not in repr(safe_tree(cfg.model_dump(mode="json")))
    assert flat_params({"aws": {"secret_access_key": "abc", "region": "x"}}) == {"aws.secret_access_key": "***", "aws.region": "x"}


def test_embedded_store_is_absolute_and_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert store.resolve().uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert store.resolve("sqlite:///rel.db").uri == f"sqlite:///{tmp_path}/rel.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.resolve().uri == "http://127.0.0.1:5000"
    assert store.resolve("runs/store").uri == (tmp_path / "runs/store").as_uri()  # a plain folder: MLflow's file store
    assert store.resolve("file:/abs/store").uri == "file:/abs/store"  # a URI already: not a folder named `file:`


def test_resolving_a_store_reads_and_writes_nothing_connecting_leaves_childrens_uris(tmp_path, monkeypatch):
    """Credentials in a URI travel with the Store, not through this process's environment; connecting
    points this process's MLflow at the store and leaves the URIs child processes inherit alone."""
    import mlflow

    for name in (*store.CREDENTIALS, "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    where = store.resolve(f"https://alice:{SECRET}@mlflow.example.com")
    assert (where.uri, where.credentials) == ("https://mlflow.example.com", {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET})
    assert SECRET not in repr(where) and dict(os.environ) == before
    local = store.resolve(f"sqlite:///{tmp_path}/m.db")
    store.connect(local, "an-experiment")
    assert mlflow.get_tracking_uri() == local.uri and mlflow.get_registry_uri() == local.uri
    assert {k: os.environ.get(k) for k in store.URI_VARIABLES} == {k: before.get(k) for k in store.URI_VARIABLES}


def train_job(jobs, cwd, env, *overrides):
    args = ["--in-process", "--set", "run.steps=3", "--set", "data.batch_size=4", "--set", "tracking.grid_every=2",
            "--set", "run.output_dir=run", *[a for o in overrides for a in ("--set", o)]]
    return jobs.run("train.py", *args, cwd=cwd, env={**env, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})


def registry_entries(uri: str, name: str) -> dict:
    """What a person checks in the registry and the run behind the `candidate` version."""
    client = store.Store(uri).client()
    version = client.get_model_version_by_alias(name, "candidate")
    run = client.get_run(version.run_id)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    return {"version": version, "run": run, "client": client, "grid_steps": sorted({int(p.split("+step+")[1].split("+")[0]) for p in images})}


def check_generates(uri: str, name: str):
    store.connect(store.Store(uri))
    model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    out = model.predict(pd.DataFrame({"prompt": ["a small red circle on the left", "a large blue square on the top"], "seed": [7, 7], "num_images": [2, 1]}))
    assert list(out["seed"]) == [7, 8, 7] and list(out["prompt"])[:2] == ["a small red circle on the left"] * 2
    images = [Image.open(io.BytesIO(b)) for b in out["image"]]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    again = model.predict(pd.DataFrame({"prompt": ["a small red circle on the left"], "seed": [8]}))
    assert again["image"][0] == out["image"][1]  # (prompt, seed) fixes the image, whatever the batch


@pytest.mark.slow
def test_training_run_is_tracked_and_registered_on_a_tracking_server(mlflow_server, tmp_path, jobs):
    host = mlflow_server.uri.removeprefix("http://")
    uri_with_secret = f"http://alice:{SECRET}@{host}"  # the server takes no auth; the secret must still never be logged
    proc = train_job(jobs, tmp_path, os.environ, f"tracking.mlflow_uri={uri_with_secret}", "tracking.registered_model=tracked", "run.name=tracked-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered tracked version 1 (alias candidate)" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    assert f"MLflow: http://{host}/#/experiments/" in proc.stdout  # the credentials left the URI for MLflow's env variables
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server

    e = registry_entries(mlflow_server.uri, "tracked")
    run, client = e["run"], e["client"]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-run"
    params, tags = run.data.params, run.data.tags
    assert params["objective.divergence"] == "score" and params["run.steps"] == "3" and params["rewards.0.name"] == "pickscore"
    assert params["tracking.mlflow_uri"] == f"http://***@{host}"  # as configured, redacted
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["distar.kind"] == "training"
    assert SECRET not in repr(params) + repr(tags)
    for key in ("reward/pickscore", "reward/clip_score", "divergence", "loss/fake_score", "samples_per_s", "skipped"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    assert e["grid_steps"] == [0, 2, 3]  # before training, every 2 updates, and the end
    store.connect(store.Store(mlflow_server.uri))
    config = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert "divergence: score" in config and SECRET not in config
    card = Path(mlflow.artifacts.download_artifacts("models:/tracked@candidate", dst_path=str(tmp_path / "model"))) / "artifacts" / "generator" / "README.md"
    text = card.read_text()
    assert "Rewards: pickscore (weight 1), clip_score (weight 0.1)" in text and "score divergence" in text and "| reward/pickscore |" in text
    assert SECRET not in text
    check_generates(mlflow_server.uri, "tracked")


@pytest.mark.slow
def test_embedded_default_store_needs_no_server(tmp_path, jobs):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = train_job(jobs, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlartifacts").is_dir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    e = registry_entries(uri, "distar-generator")
    assert str(e["version"].version) == "1" and e["run"].info.status == "FINISHED" and e["grid_steps"] == [0, 2, 3]
    assert e["run"].info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    check_generates(uri, "distar-generator")
