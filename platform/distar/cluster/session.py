"""A Ray session: join the cluster (or start a local instance), start the pools, and shut down
whatever was started when the session ends, also on failure or Ctrl-C. Training, the sweep
driver and a sweep's trials all run inside one.

Where it runs decides where Ray is: under `ray job submit` (RAY_ADDRESS set by the job) or with
RAY_ADDRESS exported it joins that cluster; inside a Ray task (a Tune trial) it uses the one it
is in; otherwise it starts a local Ray instance.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from collections.abc import Callable

from distar.config import RunConfig

# For trainer workers and pool replicas: one copy of each printed line (Ray Train would also send
# prints through its logger), and no per-load progress bars or library deprecation chatter.
QUIET = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # rank 0's system-metrics monitor announces itself otherwise
}


# Ray Train's controller looks at its workers every 2 s by default, so a run waits up to that long
# to see its worker group start and again to see it finish. Two looks a second cost the workers
# nothing measurable and save about 5 s a run (a 3-step smoke job: 45 s -> 40.5 s).
TRAIN_CONTROLLER = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def set_train_controller_env() -> None:
    """Put TRAIN_CONTROLLER in this driver's environment, where Ray Train reads it and passes it on
    to the controller it starts; a value the user set wins."""
    for name, value in TRAIN_CONTROLLER.items():
        os.environ.setdefault(name, value)


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """The environment of a run's trainer workers and pool replicas: quiet, and DeepSpeed on the
    accelerator the trainers are given (told, not guessed)."""
    return {**QUIET, "DS_ACCELERATOR": "cuda" if cfg.cluster.trainer_gpus > 0 else "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_id() -> str | None:
    """The submission id when this driver runs under `ray job submit`."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return json.loads(raw).get("metadata", {}).get("job_submission_id") if raw else None


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


def _connect(cfg: RunConfig, cpus: float | None) -> str:
    """Join the cluster at RAY_ADDRESS, or start a local instance with `cpus` logical CPUs (default:
    room for the pools and one run's trainers); returns the dashboard's URL."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # Logical CPUs are what Ray schedules by: a local instance offers enough for every role,
        # which then share the machine's cores.
        cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed(cfg) if cpus is None else cpus))
        port = free_port()
        # Ray's state API finds a cluster through RAY_API_SERVER_ADDRESS, else through the address
        # file `ray start` leaves behind, which can name another (or a dead) cluster. Ray Train's
        # placement-group cleaner asks it whether a stopped trial's controller is gone.
        env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        context = ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                           runtime_env={"env_vars": env})
    url = context.dashboard_url
    return f"http://{url}" if url and not url.startswith("http") else (url or "(dashboard not running)")


class RaySession:
    """`with RaySession(cfg) as session:` Ray is there; pools started with session.start_pools()
    are deleted when the block ends, and so is a local instance the session started. A session
    that connected this process leaves the cluster too, so Ray's buffered log lines print before
    the job's last line."""

    def __init__(self, cfg: RunConfig, cpus: float | None = None, log: Callable[[str], None] = print):
        self.cfg, self.cpus, self.log = cfg, cpus, log
        self.connected, self.pools = False, None

    def __enter__(self) -> RaySession:
        import ray

        if not ray.is_initialized():  # else: inside a Ray task (a Tune trial), on the cluster it runs on
            self.connected = True
            on_sigterm = signal.getsignal(signal.SIGTERM)
            self.log(f"Ray dashboard: {_connect(self.cfg, self.cpus)}" + (f" (job {job_id()})" if job_id() else ""))
            if callable(on_sigterm):  # Ray's core installs a SIGTERM handler that aborts the process: the job's comes back
                signal.signal(signal.SIGTERM, on_sigterm)
        return self

    def start_pools(self, trials: int = 1, wait: bool = True):
        """Deploy the reward and reference pools of the session's config for `trials` concurrent runs
        and wait until they are ready (`wait=False`: until Serve has them; see Pools.start)."""
        from distar.cluster.pools import Pools

        self.pools = Pools.start(self.cfg, worker_env(self.cfg), clients=trials * self.cfg.cluster.trainer_workers, wait=wait)
        return self.pools

    def __exit__(self, *exc) -> None:
        import ray

        try:
            if self.pools is not None:
                self.pools.shutdown()
        finally:
            if self.connected:
                ray.shutdown()  # stops a local instance; leaves a cluster it joined running
