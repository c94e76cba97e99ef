"""One sweep trial as Tune runs it (the Ray Train V2 pattern: a Tune function trainable that
launches the TorchTrainer): the base config with the trial's sampled values, a child MLflow run
under the sweep's, and a full training run against the sweep's shared pools, whose reports reach
Tune's scheduler through TuneReportCallback. A completed trial logs its generator into its run;
the sweep registers only the one it selects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distar.cluster.pools import Pools
from distar.config import RunConfig
from distar.sweep.space import apply

TRIAL_TAG = "distar.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the trial under the sweep


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, handed to Tune once (tune.with_parameters)."""

    base: dict  # the base run config, paths absolute
    pools: Pools | None  # None: the trial starts its own (the baseline of bench/sweep_sharing.py)
    parent_run_id: str
    job_id: str | None


def trial_config(base: dict, sampled: dict[str, Any], trial_id: str) -> RunConfig:
    """The trial's run config: its sampled values, its own name, and output folder and checkpoint
    storage under the sweep's."""
    cfg = RunConfig.model_validate(base)
    own = {"run.name": f"{cfg.run.name}-{trial_id}", "run.output_dir": str(Path(cfg.run.output_dir) / "trials" / trial_id)}
    if cfg.run.storage_path:
        own["run.storage_path"] = f"{cfg.run.storage_path.rstrip('/')}/trials/{trial_id}"
    return apply(cfg, {**sampled, **own})


def child_run(client, parent_run_id: str, trial_id: str) -> str | None:
    """The trial's run from an earlier attempt of this sweep (a resumed sweep reopens it)."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def run_trial(sampled: dict[str, Any], setup: TrialSetup) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distar.cluster import launch
    from distar.cluster.session import RaySession
    from distar.tracking import registry, store
    from distar.tracking.runs import TrainingRun

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup.base, sampled, trial_id)
    where = store.resolve(cfg.tracking.mlflow_uri)
    store.connect(where)  # this trial's process talks to the sweep's store
    earlier = child_run(where.client(), setup.parent_run_id, trial_id)
    tags = {PARENT_TAG: setup.parent_run_id, TRIAL_TAG: trial_id}
    with RaySession(cfg) as session, TrainingRun(cfg, setup.job_id, kind="trial", tags=tags, run_id=earlier) as tracked:
        pools = setup.pools or session.start_pools()
        outcome = launch.fit(cfg, pools, tracked.target, callbacks=[TuneReportCallback()])
        registry.log_generator(tracked.client, tracked.run_id, outcome.exported(), cfg)
        tracked.finish()
