"""One MLflow run per training run: the driver opens it (params, tags, the config) and closes it
(registering the generator on success, nothing on failure); rank 0 of the trainer writes the
per-step metrics, the image grids and the system metrics into it.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distar.config import RunConfig, to_yaml
from distar.errors import UserError
from distar.tracking import store

ROOT = Path(__file__).resolve().parents[3]  # the checkout, when distar runs from one


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": [1]}} -> {"a.b.0": "1"}, secrets redacted: the run's params."""
    out: dict[str, str] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            out.update(flat_params(value, path + "."))
        else:
            out[path] = str(store.redacted(key, value))
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person finds a run: its page on a tracking server, or how to browse a local store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {store.redact(uri)} (browse with `mlflow ui --backend-store-uri {store.redact(uri)}`)"


def end_with_error(client, run_id: str, kind: type[BaseException], error: BaseException) -> None:
    """End a run KILLED (Ctrl-C) or FAILED, with the error as the `distar.error` tag."""
    interrupted = issubclass(kind, KeyboardInterrupt)
    text = error.message if isinstance(error, UserError) else str(error)  # without the kind a job prints before it
    client.set_tag(run_id, "distar.error", "interrupted" if interrupted else store.redact(f"{kind.__name__}: {text}")[:5000])
    client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")


@dataclass(frozen=True)
class RunTarget:
    """What rank 0 needs to write into the driver's run, wherever it runs: the store (with its
    credentials, never printed) and the run."""

    store: store.Store
    run_id: str
    grid_every: int


class TrainingRun:
    """The driver's side. Used as a context manager: an exception ends the run FAILED with the
    error as a tag, and nothing is registered."""

    def __init__(self, cfg: RunConfig, job_id: str | None = None, kind: str = "training", tags: dict[str, str] | None = None,
                 run_id: str | None = None):
        """`kind` and `tags` mark sweeps and their trials; `run_id` reopens a run (a resumed sweep's)."""
        import mlflow

        self.cfg, self.store = cfg, store.resolve(cfg.tracking.mlflow_uri)
        self.uri = self.store.uri
        experiment = store.connect(self.store, cfg.tracking.experiment)
        tags = {"distar.kind": kind, "mlflow.source.git.commit": git_commit(), "ray.job_id": job_id,
                "distar.output_dir": str(Path(cfg.run.output_dir).resolve()), **(tags or {})}
        self.client = self.store.client()
        if run_id is None:
            run_id = self.client.create_run(experiment, run_name=cfg.run.name, tags={k: v for k, v in tags.items() if v}).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        params = flat_params(cfg.model_dump(mode="json"))
        names = list(params)
        for i in range(0, len(names), 100):  # MLflow takes at most 100 params per batch (the same values again on reopening)
            self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, params[k]) for k in names[i : i + 100]])
        self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")

    @property
    def target(self) -> RunTarget:
        return RunTarget(self.store, self.run_id, self.cfg.tracking.grid_every)

    def link(self) -> str:
        return run_link(self.uri, self.client.get_run(self.run_id).info.experiment_id, self.run_id)

    def register(self, folder: Path):
        """Log the exported generator as a pyfunc model, register it with alias `candidate`,
        and end the run FINISHED. Returns the model version."""
        from distar.tracking import registry

        version = registry.register(self.client, self.run_id, folder, self.cfg)
        self.finish()
        return version

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            end_with_error(self.client, self.run_id, kind, error)


class StepLogger:
    """Rank 0's side: every step's values (sent in batches), grids and system metrics."""

    def __init__(self, target: RunTarget, flush_every: int = 25):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.target, self.flush_every, self.pending = target, flush_every, []
        store.connect(target.store)  # rank 0 of a Ray Train run is a process of its own
        self.client = target.store.client()
        self.system = SystemMetricsMonitor(target.run_id, resume_logging=True, tracking_uri=target.store.uri)  # MLFLOW_SYSTEM_METRICS_* env vars tune it
        self.system.start()

    def step(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), stamp, step) for k, v in values.items() if np.isfinite(v)]
        if step % self.flush_every == 0:
            self.flush()

    def grid(self, step: int, pixels: np.ndarray) -> None:
        """One grid image per call, keyed by step: the MLflow UI shows them on a step slider."""
        self.client.log_image(self.target.run_id, pixels, key="grid", step=step)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.target.run_id, text, name)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.target.run_id, key, value)

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow's batch limit
            self.client.log_batch(self.target.run_id, metrics=self.pending[i : i + 1000])
        self.pending = []

    def close(self) -> None:
        self.flush()
        self.system.finish()
