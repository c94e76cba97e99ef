"""The driver of a run on Ray: join or start a cluster, start the pools, run the trainer on Ray
Train, and shut the pools down at the end, also on failure or Ctrl-C.

Where it runs decides where Ray is: under `ray job submit` (RAY_ADDRESS set by the job) or with
RAY_ADDRESS exported it joins that cluster; otherwise it starts a local Ray instance.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

from distar import storage
from distar.config import RunConfig
from distar.errors import RunFailed
from distar.models.sources import TINY, TOY
from distar.tracking.runs import RunTarget

BUILT_IN = (TINY, TOY)  # source names, not paths, even where a folder of that name exists

# For trainer workers and pool replicas: one copy of each printed line (Ray Train would also send
# prints through its logger), and no per-load progress bars or library deprecation chatter.
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # rank 0's system-metrics monitor announces itself otherwise
}


class RunStopped(RunFailed):
    """The trainer stopped the run early; str() says why."""


def local_paths_made_absolute(cfg: RunConfig) -> RunConfig:
    """Trainer workers and pool replicas run in other working directories: hand them absolute paths."""
    tree = cfg.model_dump(mode="json")
    tree["run"]["output_dir"] = str(Path(cfg.run.output_dir).resolve())
    if cfg.run.storage_path and not storage.is_s3(cfg.run.storage_path):
        tree["run"]["storage_path"] = str(Path(cfg.run.storage_path).expanduser().resolve())
    local = lambda v: v is not None and v not in BUILT_IN and Path(v).expanduser().exists()  # noqa: E731
    for section, key in (("data", "prompts"), ("data", "validation_prompts"), ("model", "reference"), ("model", "generator_init")):
        if local(tree[section][key]):
            tree[section][key] = str(Path(tree[section][key]).expanduser().resolve())
    for reward in tree["rewards"]:
        if local(reward["source"]):
            reward["source"] = str(Path(reward["source"]).expanduser().resolve())
    return RunConfig.model_validate(tree)


def pool_resources(cfg: RunConfig) -> dict[str, float]:
    """What the reward and reference pools take from the cluster, all replicas together."""
    pools = (cfg.cluster.reward_pool, cfg.cluster.reference_pool)
    return {"CPU": sum(p.replicas * p.num_cpus for p in pools), "GPU": sum(p.replicas * p.num_gpus for p in pools)}


def trainer_resources(cfg: RunConfig) -> dict[str, float]:
    """What one run's trainer workers take, all workers together."""
    c = cfg.cluster
    return {"CPU": c.trainer_workers * c.trainer_cpus, "GPU": c.trainer_workers * c.trainer_gpus}


def cpus_needed(cfg: RunConfig, trials: int = 1) -> float:
    """Logical CPUs for the pools and `trials` concurrent runs' trainers."""
    return pool_resources(cfg)["CPU"] + trials * trainer_resources(cfg)["CPU"]


def connect(cfg: RunConfig, cpus: float | None = None) -> str:
    """Join the cluster at RAY_ADDRESS, or start a local instance with `cpus` logical CPUs (default:
    room for the pools and one run's trainers); returns the dashboard's URL."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # Logical CPUs are what Ray schedules by: a local instance offers enough for every role,
        # which then share the machine's cores.
        cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(cfg) if cpus is None else cpus))
        port = _free_port()
        # Ray's state API finds a cluster through RAY_API_SERVER_ADDRESS, else through the address
        # file `ray start` leaves behind, which can name another (or a dead) cluster. Ray Train's
        # placement-group cleaner asks it whether a stopped trial's controller is gone.
        env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        context = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                           runtime_env={"env_vars": env})
    url = context.dashboard_url
    return f"http://{url}" if url and not url.startswith("http") else (url or "(dashboard not running)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_id() -> str | None:
    """The submission id when this driver runs under `ray job submit`."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return json.loads(raw).get("metadata", {}).get("job_submission_id") if raw else None


def fit(cfg: RunConfig, pools, tracking: RunTarget | None, callbacks: list = ()) -> Path:
    """Run the trainer on Ray Train against running pools; returns the exported generator folder.
    The same output folder resumes from its checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from distar.cluster.train_loop import train_loop
    from distar.config import to_yaml

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    location = cfg.run.storage_path or str(out)
    storage_path, filesystem = storage.checkpoint_location(location)
    c = cfg.cluster
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run": cfg.model_dump(mode="json"), "reward": pools.reward, "reference": pools.reference, "tracking": tracking},
        scaling_config=ScalingConfig(num_workers=c.trainer_workers, use_gpu=c.trainer_gpus > 0,
                                     resources_per_worker={"CPU": c.trainer_cpus, **({"GPU": c.trainer_gpus} if c.trainer_gpus else {})}),
        run_config=TrainRunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=filesystem,  # the same name and path resume the run
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": WORKER_ENV},
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except SystemExit as e:  # Ray Train's own Ctrl-C handler aborts the run, then exits
        raise KeyboardInterrupt from e
    if result.metrics.get("stopped"):
        raise RunStopped(f"run stopped at step {result.metrics['step']}: {cfg.run.max_consecutive_skips} updates in a row had a non-finite "
                         f"loss or reward (run.max_consecutive_skips); the last checkpoint, under {location.rstrip('/')}/checkpoints, keeps the weights of the last applied update")
    return out / "generator"


def train(cfg: RunConfig, tracking: RunTarget | None = None, log: Callable[[str], None] = print) -> Path:
    """One run: connect, start the pools, train, and shut the pools down (also on failure or Ctrl-C)."""
    import ray

    from distar.cluster.pools import Pools

    cfg = local_paths_made_absolute(cfg)
    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    log(f"Ray dashboard: {connect(cfg)}" + (f" (job {job_id()})" if job_id() else ""))
    pools = None
    try:
        log("starting the reward and reference pools (Ray Serve)")
        pools = Pools.start(cfg, WORKER_ENV)
        return fit(cfg, pools, tracking)
    finally:
        if pools is not None:
            pools.shutdown()
        if started_ray:
            ray.shutdown()
