"""The driver of a run on Ray: in a Ray session (distar.cluster.session) with the pools started,
the trainer runs on Ray Train, every worker running the run loop (distar.cluster.train_worker).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distar import storage
from distar.cluster.session import RaySession, set_train_controller_env, worker_env
from distar.config import RunConfig, absolute_paths
from distar.errors import UserError
from distar.run.runtime import Outcome
from distar.tracking.runs import RunTarget
from distar.tracking.store import safe_tree


def _not_in_process(location: str) -> None:
    """Ray Train would ignore an in-process run's checkpoints and start over beside them."""
    from distar.run.in_process import Checkpoints

    if Checkpoints(location).complete():
        raise UserError(f"{location.rstrip('/')}/checkpoints holds the checkpoints of an in-process run; resume it with --in-process, "
                        "or give this run another run.output_dir")


def fit(cfg: RunConfig, pools, tracking: RunTarget | None, callbacks: list = ()) -> Outcome:
    """Run the trainer on Ray Train against the pools (the workers' first requests wait until they
    run); returns how the run ended. The same output folder (or run.storage_path) resumes from its
    checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig, TrainingFailedError
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from distar.cluster.train_worker import train_worker

    location = cfg.run.storage_path or cfg.run.output_dir
    _not_in_process(location)
    Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
    storage_path, filesystem = storage.checkpoint_location(location)
    c = cfg.cluster
    set_train_controller_env()
    trainer = TorchTrainer(
        train_worker,
        # Ray keeps this in its run state, which the dashboard shows: the config goes redacted (rank 0
        # writes to MLflow through the tracking target, whose credentials never print).
        train_loop_config={"run": safe_tree(cfg.model_dump(mode="json")), "reward": pools.reward, "reference": pools.reference, "tracking": tracking,
                           "apps": pools.by_role},
        scaling_config=ScalingConfig(num_workers=c.trainer_workers, use_gpu=c.trainer_gpus > 0,
                                     resources_per_worker={"CPU": c.trainer_cpus, **({"GPU": c.trainer_gpus} if c.trainer_gpus else {})}),
        run_config=TrainRunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=filesystem,  # the same name and path resume the run
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(cfg)},
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except SystemExit as e:  # Ray Train's own Ctrl-C handler aborts the run, then exits
        raise KeyboardInterrupt from e
    except TrainingFailedError as e:
        failure = _run_failure(e)
        if failure is None:
            raise
        raise failure from e
    return result.return_value  # rank 0's outcome of the run loop


def _run_failure(error) -> UserError | None:
    """The run-ending error a worker raised (a pool that keeps failing, a bad input found late),
    to end the job in its one line; None for anything else, a bug, which keeps its traceback."""
    for failure in getattr(error, "worker_failures", {}).values():
        cause = getattr(failure, "_base_exc", failure)  # Ray Train wraps each worker's exception with its traceback text
        if isinstance(cause, UserError):
            return cause
    return None


def train(cfg: RunConfig, tracking: RunTarget | None = None, log: Callable[[str], None] = print) -> Outcome:
    """One run: in a Ray session, start the pools and train; the session shuts the pools down. The
    trainer sets itself up while the pools load."""
    cfg = absolute_paths(cfg)
    with RaySession(cfg, log=log) as session:
        log("starting the reward and reference pools (Ray Serve) and the trainer")
        pools = session.start_pools(wait=False)
        return fit(cfg, pools, tracking)
