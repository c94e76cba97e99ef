"""The sweep driver: join or start a cluster, open the sweep's MLflow run, start one set of pools
for every trial, run the trials with Tune (search algorithm, scheduler and concurrency from the
space file and the cluster), then write the results table and the Pareto plot, and register the
selected trial's generator with alias `candidate`.

The sweep's folder (the base config's run.output_dir) holds Tune's experiment state and every
trial's checkpoints: the same command on the same folder resumes an interrupted sweep, trials
from their last checkpoints, into the same MLflow runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from distar.cluster import session
from distar.config import RunConfig, absolute_paths
from distar.errors import RunFailed, UserError
from distar.run import resume
from distar.sweep import results, selection
from distar.sweep.space import Space, SpaceError
from distar.sweep.trial import TrialSetup, child_run, run_trial, trial_config
from distar.tracking import registry, store
from distar.tracking.runs import TrainingRun, end_with_error

STATE_FILE = "sweep.json"  # the sweep's MLflow run, for resuming into it
TRIALS_FILE = "trials.json"  # every trial's last state, written when Tune's experiment ends
ENDED_FILE = "trials_ended.jsonl"  # the trials that ended (not interrupted), appended as they do
DRIVER_CPU = 0.1  # each trial's function only drives its Ray Train run; the trainer workers hold the real resources


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the sweep before every trial ended; running it again resumes it."""


@dataclass
class SweepResult:
    parent_run_id: str
    outcomes: list[results.Outcome]
    chosen: results.Outcome | None
    version: object | None  # the registered model version
    table: Path
    plot: Path


def _needs(cfg: RunConfig, shared_pools: bool) -> tuple[dict[str, float], dict[str, float]]:
    """(what the sweep holds once, what each running trial holds): pools shared or one set a trial."""
    pools, trial = session.pool_resources(cfg), session.trainer_resources(cfg)
    trial["CPU"] += DRIVER_CPU
    if shared_pools:
        return pools, trial
    return {"CPU": 0.0, "GPU": 0.0}, {k: trial[k] + pools[k] for k in trial}


def concurrency(cfg: RunConfig, space: Space, resources: dict[str, float], shared_pools: bool = True) -> int:
    """Trials that run at once: as many as the cluster holds beside the pools, each with all its
    trainer workers (no trial waits on another for CPUs or GPUs), at most the space's cap."""
    once, trial = _needs(cfg, shared_pools)
    room = [int((resources.get(k, 0.0) - once[k]) // trial[k] + 1e-9) for k in ("CPU", "GPU") if trial[k] > 0]
    if min(room) < 1:
        raise UserError(f"cluster: {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs leave no room for one trial "
                        f"({trial['CPU']:g} CPUs, {trial['GPU']:g} GPUs) beside the shared pools ({once['CPU']:g} CPUs, {once['GPU']:g} GPUs)")
    return min(min(room), space.max_concurrent or space.trials, space.trials)


def validations_per_trial(cfg: RunConfig) -> int:
    """How many validations a full trial reports (ASHA's time unit): every validate_every steps and after the last."""
    return math.ceil(cfg.run.steps / cfg.run.validate_every)


def _search(space: Space, n: int):
    """The search algorithm, holding at most `n` trials in flight."""
    if space.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=space.metric, mode=space.mode, seed=space.seed), max_concurrent=n)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=space.seed, max_concurrent=n)


def _scheduler(cfg: RunConfig, space: Space):
    """ASHA counts time in validations. Its rungs stop short of a trial's last validation: a trial
    that reached its last step finishes (exports and logs its generator) and competes in the selection."""
    if space.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    last_rung = validations_per_trial(cfg) - 1
    if space.grace_period > last_rung:
        raise SpaceError(f"scheduler.grace_period: {space.grace_period}, but ASHA can stop a trial only after validations 1 to {last_rung} "
                        f"(run.steps {cfg.run.steps} / run.validate_every {cfg.run.validate_every} makes {last_rung + 1}); lower it or validate more often")
    return tune.schedulers.ASHAScheduler(time_attr="validations", metric=space.metric, mode=space.mode, max_t=last_rung, stop_last_trials=False,
                                         grace_period=space.grace_period, reduction_factor=space.reduction_factor)


def _error_line(trial) -> str | None:
    """The last line of the trial's error as Tune wrote it (the exception, after its traceback)."""
    path = Path(trial.error_file) if trial.error_file else None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()] if path and path.is_file() else []
    return lines[-1] if lines else None


def _trial_row(trial, status: str) -> dict:
    return {"trial_id": trial.trial_id, "status": status, "config": dict(trial.config),
            "last": {k: v for k, v in (trial.last_result or {}).items() if isinstance(v, (int, float, str, bool))},
            "error": _error_line(trial) if status == "ERROR" else None}


class _Ledger(tune.Callback):
    """Appends each trial's end (completed or stopped by the scheduler: TERMINATED; crashed:
    ERROR) to a file as it happens, and writes every trial's last state when the experiment
    ends. A trial with no end recorded was interrupted: Tune marks those TERMINATED too, but
    resumes them. The file outlives a resumed sweep, which keeps this callback."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _ended(self, trial, status: str) -> None:
        with (self.folder / ENDED_FILE).open("a") as f:
            f.write(json.dumps(_trial_row(trial, status)) + "\n")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "ERROR")

    def on_experiment_end(self, trials, **info):
        (self.folder / TRIALS_FILE).write_text(json.dumps([_trial_row(t, "SEEN") for t in trials], indent=1))


def _outcomes(folder: Path, cfg: RunConfig, client, parent_run_id: str) -> list[results.Outcome]:
    """One Outcome per trial, its child run ended to match (a trial Tune stopped or interrupted
    could not end its own run)."""
    ended_file, seen_file = folder / ENDED_FILE, folder / TRIALS_FILE
    ended = {row["trial_id"]: row for row in map(json.loads, ended_file.read_text().splitlines())} if ended_file.is_file() else {}
    out = []
    for seen in sorted(json.loads(seen_file.read_text()) if seen_file.is_file() else [], key=lambda t: t["trial_id"]):
        trial = ended.get(seen["trial_id"], {**seen, "status": "INTERRUPTED"})
        last, trial_id = trial["last"], trial["trial_id"]
        status = results.status_of(trial["status"], last, cfg.run.steps, trial["error"] is not None)
        run_id = child_run(client, parent_run_id, trial_id)
        run = client.get_run(run_id) if run_id else None
        message = None if status == results.STOPPED else (run.data.tags.get("distar.error") if run else None) or trial["error"]
        if run is not None and status == results.STOPPED and run.info.status != "FINISHED":
            # Tune stops a trial by exiting its thread, which the trial may have recorded as a failure first: the ledger's word wins.
            if "distar.error" in run.data.tags:
                client.delete_tag(run_id, "distar.error")
            client.set_tag(run_id, "distar.stopped", f"stopped early by the scheduler at step {last.get('step')} "
                           f"after {last.get('validations')} validations")
            client.set_terminated(run_id, "KILLED")
        elif run is not None and run.info.status == "RUNNING":
            end_with_error(client, run_id, KeyboardInterrupt if status == results.INTERRUPTED else RuntimeError, RuntimeError(message))
        metrics = {k: float(v) for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.append(results.Outcome(trial_id, status, trial["config"], metrics, run_id, message))
    return out


def _tuner(cfg: RunConfig, space: Space, setup: TrialSetup, folder: Path, n: int) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": DRIVER_CPU})
    run_config = tune.RunConfig(name="tune", storage_path=str(folder), callbacks=[_Ledger(folder)], verbose=1,
                                failure_config=tune.FailureConfig(max_failures=0))  # a failed trial stays failed; Ray Train retries its workers
    if tune.Tuner.can_restore(folder / "tune"):
        return tune.Tuner.restore(str(folder / "tune"), trainable, resume_unfinished=True, restart_errored=False)
    tune_config = tune.TuneConfig(num_samples=space.num_samples, search_alg=_search(space, n), scheduler=_scheduler(cfg, space),
                                  trial_dirname_creator=lambda t: t.trial_id)
    return tune.Tuner(trainable, param_space=space.param_space(), tune_config=tune_config, run_config=run_config)


def sweep(cfg: RunConfig, space: Space, space_text: str, log: Callable[[str], None] = print, shared_pools: bool = True) -> SweepResult:
    """Run the sweep (see the module docstring). shared_pools=False gives every trial its own
    pools, started and stopped by the trial: the baseline that bench/sweep_sharing.py measures."""
    import ray

    cfg = absolute_paths(cfg)
    folder = Path(cfg.run.output_dir)
    local_trials = min(space.max_concurrent or 1, space.trials)  # what a local instance makes room for
    once, trial = _needs(cfg, shared_pools)
    with resume.locked(folder):
        earlier = _earlier(folder, cfg, space_text)
        with session.RaySession(cfg, once["CPU"] + local_trials * trial["CPU"], log) as ray_session:
            n = concurrency(cfg, space, ray.cluster_resources(), shared_pools)
            with TrainingRun(cfg, session.job_id(), kind="sweep", run_id=earlier) as parent:
                record = {"parent_run_id": parent.run_id, "space": space_text, "config": store.safe_tree(cfg.model_dump(mode="json"))}
                _record(folder, record)
                parent.client.log_text(parent.run_id, space_text, "space.yaml")
                log(f"MLflow: {parent.link()}" + (" (resumed)" if earlier else ""))
                outcomes = _trials(cfg, space, parent, ray_session if shared_pools else None, n, fresh=earlier is None, log=log)
                result = _conclude(cfg, space, parent, outcomes, folder, log)
                _record(folder, {**record, "finished": True})
                return result


def _earlier(folder: Path, cfg: RunConfig, space_text: str) -> str | None:
    """The MLflow run of the interrupted sweep this one resumes, if any; refuses (exit 2) a folder
    that holds a finished sweep, a training run, or an interrupted sweep of other files."""
    state = folder / STATE_FILE
    recorded = json.loads(state.read_text()) if state.is_file() else {}
    if recorded.get("finished"):
        raise UserError(f"run.output_dir: {folder} holds a finished sweep (MLflow run {recorded['parent_run_id']}); choose another folder")
    if not recorded and resume.latest(str(folder)) is not None:
        raise UserError(f"run.output_dir: {folder} holds a training run's checkpoints; give the sweep another run.output_dir")
    if not recorded or not tune.Tuner.can_restore(folder / "tune"):
        return None
    if recorded.get("space", space_text) != space_text:
        raise UserError(f"--space: {folder} holds an interrupted sweep of another space file; resume it with the same "
                        "space file, or give this sweep another run.output_dir")
    differ = resume.differences(recorded["config"], cfg) if "config" in recorded else []
    if differ:
        raise UserError(f"run.output_dir: {folder} holds an interrupted sweep whose base config trains differently: {'; '.join(differ)}. "
                        "Resume it with the same config, or give this sweep another run.output_dir")
    return recorded["parent_run_id"]


def _record(folder: Path, record: dict) -> None:
    """sweep.json, replaced whole: a crash leaves the old record or the new one, never half of one."""
    part = folder / f"{STATE_FILE}.part"
    part.write_text(json.dumps(record))
    os.replace(part, folder / STATE_FILE)


def trial_base(cfg: RunConfig, parent_uri: str) -> dict:
    """The config every trial starts from, with the parent run's store named: a trial runs in a
    working directory of Tune's, where the default store would be another, empty database."""
    base = cfg.model_dump(mode="json")
    base["tracking"]["mlflow_uri"] = cfg.tracking.mlflow_uri or parent_uri
    return base


def _trials(cfg: RunConfig, space: Space, parent: TrainingRun, ray_session, n: int, fresh: bool, log) -> list[results.Outcome]:
    """Every trial run to its end with Tune; `ray_session` starts the shared pools (None: each trial its own)."""
    from distar.cluster.pools import start_serve

    folder = Path(cfg.run.output_dir)
    log(f"{space.trials} trials, {n} at a time; " + ("starting the shared reward and reference pools (Ray Serve)" if ray_session else "each with its own pools"))
    if ray_session is not None:
        pools = ray_session.start_pools(trials=n)
    else:
        pools = None
        start_serve()  # each trial deploys its own pools on it
    setup = TrialSetup(trial_base(cfg, parent.uri), pools, parent.run_id, session.job_id())
    if fresh:  # nothing to resume: an earlier attempt's ledger would mislabel these trials
        for name in (TRIALS_FILE, ENDED_FILE):
            (folder / name).unlink(missing_ok=True)
    _tuner(cfg, space, setup, folder, n).fit()
    outcomes = _outcomes(folder, cfg, parent.client, parent.run_id)
    if any(o.status == results.INTERRUPTED for o in outcomes) or not outcomes:
        raise SweepInterrupted(f"the sweep stopped before every trial ended; run the same command again to resume it from {folder}")
    return outcomes


def _conclude(cfg: RunConfig, space: Space, parent: TrainingRun, outcomes: list[results.Outcome], folder: Path, log) -> SweepResult:
    """The table, the plot and the selection: registers the selected trial's generator and ends the parent run FINISHED."""
    from distar.run.validation import metric_names

    metrics = metric_names(cfg)
    reference = selection.reference_values(cfg) if selection.needs_reference(space.require) else None
    limits = selection.bounds(space.require, reference or {})
    rule = selection.describe(space.select_metric, space.select_mode, space.require, limits)
    chosen = selection.select(outcomes, space.select_metric, space.select_mode, limits)
    table = folder / "results.md"
    table.write_text(results.markdown(outcomes, list(space.parameters), metrics, chosen, rule, limits, reference))
    (folder / "results.csv").write_text(results.to_csv(outcomes, list(space.parameters), metrics, limits, reference))
    reward = metrics[0]  # the first configured reward
    alignment = next((m for m in ("val/acc/all", "val/reward/clip_score") if m in metrics and m != reward), None)
    realism = next((m for m in ("val/world/fid", "val/world/misplaced") if m in metrics), None)
    axes = [m for m in (alignment, realism) if m] + ["divergence"]
    plot = results.pareto_png(outcomes, reward, axes, chosen, folder / "pareto.png", limits, reference)
    for path in (table, folder / "results.csv", plot):
        parent.client.log_artifact(parent.run_id, str(path))
    if reference:
        parent.client.log_batch(parent.run_id, metrics=[_metric(f"reference/{k}", v) for k, v in reference.items()])
    counts = {s: sum(o.status == s for o in outcomes) for s in (results.COMPLETED, results.STOPPED, results.FAILED)}
    parent.client.log_batch(parent.run_id, metrics=[_metric(f"trials/{s.replace(' ', '_')}", c) for s, c in counts.items()])
    log(table.read_text())
    if chosen is None:
        raise RunFailed(f"no completed trial with a finite {space.select_metric} meets the rule ({rule}): nothing registered (see {table})")
    trial_cfg = trial_config(cfg.model_dump(mode="json"), chosen.params, chosen.trial_id)
    model_uri = parent.client.get_run(chosen.run_id).data.tags[registry.MODEL_URI_TAG]
    version = registry.register_logged(parent.client, model_uri, trial_cfg)
    parent.client.set_tag(parent.run_id, "distar.selected_trial", chosen.trial_id)
    parent.client.set_tag(parent.run_id, "distar.selection_rule", rule)
    parent.client.log_batch(parent.run_id, metrics=[_metric(f"best/{space.select_metric}", chosen.metrics[space.select_metric])])
    parent.finish()
    return SweepResult(parent.run_id, outcomes, chosen, version, table, plot)


def _metric(key: str, value: float):
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)
