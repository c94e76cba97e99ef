import os

# Tests never reach a model hub: every model is built from a config and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and OpenMP spin-waits slow them ~100x when
# another process (a Ray worker, a second test) holds the other core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from distar.models import tiny  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A tiny random SD1.5-structured diffusers folder, built once per session."""
    return tiny.build_sd15_pipeline(tmp_path_factory.mktemp("models") / "sd15")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel folder (PickScore / CLIP-score architecture)."""
    return tiny.build_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="session", autouse=True)
def _tracking_store(tmp_path_factory):
    """Runs that tests start (and Ray clusters they start) track into a store of the session's,
    never into ./mlflow.db of the checkout."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('tracking')}/mlflow.db"


@pytest.fixture(autouse=True)
def _mlflow_store_restored(monkeypatch):
    """MLflow remembers the last store a process connected to (module globals, and
    MLFLOW_REGISTRY_URI in os.environ, which subprocesses inherit): put them back after each test,
    so no later test or job reaches a store, or a stopped server, of an earlier one."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    monkeypatch.setattr(registry, "_registry_uri", registry._registry_uri)
    monkeypatch.setattr(tracking, "_tracking_uri", tracking._tracking_uri)
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_URI"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


def mlflow_client(uri: str):
    """A client of that store for runs and the registry alike (not the registry MLflow last used)."""
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Built-in sources (`tiny-random`) materialise under the test's own folder."""
    monkeypatch.setenv("DISTAR_CACHE", str(tmp_path / "cache"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc, timeout: float, sig: int | None = None) -> None:
    """End what a test started in its own process group (start_new_session=True): `sig`
    (SIGTERM by default) to the group, SIGKILL if it is still there after `timeout` s."""
    import signal
    import subprocess

    os.killpg(proc.pid, sig or signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class RayCluster:
    """A real single-node Ray cluster: `ray start --head --block` in its own process group."""

    def __init__(self, root):
        import secrets
        import subprocess
        import sys
        from pathlib import Path

        self.port, self.dashboard_port, self.metrics_port = _free_port(), _free_port(), _free_port()
        self.address, self.dashboard = f"127.0.0.1:{self.port}", f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        # Token auth as Ray 2.60 sets it up by default, with a token of this cluster's own.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "DISTAR_CACHE": str(root / "cache"), "RAY_metrics_report_interval_ms": "1000",
                    "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": "",
                    "RAY_API_SERVER_ADDRESS": self.dashboard}  # not the address file of whichever cluster started last
        self.proc = subprocess.Popen(
            [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--num-cpus=4", "--disable-usage-stats",
             f"--ray-client-server-port={_free_port()}", f"--metrics-export-port={self.metrics_port}"],
            env=self.env, stdout=open(root / "ray_head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.run_env = {**self.env, "RAY_ADDRESS": self.address}
        try:
            self._wait_ready()
        except BaseException:  # the caller gets no object to stop
            self.stop()
            raise

    def _wait_ready(self, timeout=120):
        import subprocess
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}")
            probe = subprocess.run(["ray", "job", "list", "--address", self.dashboard], env=self.env, capture_output=True, timeout=60)
            if probe.returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError(f"the Ray head did not answer within {timeout} s")

    def stop(self):
        stop_group(self.proc, timeout=45)  # the head drains for up to 30 s


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    yield cluster
    cluster.stop()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend, in its own process group. By
    default it serves artifacts from a folder; `artifacts` replaces the server's artifact options
    (e.g. an s3:// destination, with the endpoint and credentials in `env`)."""

    def __init__(self, root, artifacts: tuple[str, ...] = (), env: dict | None = None):
        import subprocess
        import sys
        import time
        from pathlib import Path

        import requests

        self.uri = f"http://127.0.0.1:{_free_port()}"
        port = self.uri.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", *(artifacts or ("--artifacts-destination", str(root / "artifacts")))],
            env=env, stdout=open(root / "mlflow_server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; see {root / 'mlflow_server.log'}")
            try:
                if requests.get(self.uri + "/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError("mlflow server did not answer within 90 s")

    def stop(self):
        stop_group(self.proc, timeout=20)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def register_toy_generator(tmp_path_factory):
    """Train a toy-world generator for a few steps in-process, tracked into an MLflow store, and
    register it as jobs/train.py does; returns the model version."""
    from distar.config import load_config
    from distar.roles.in_process import train
    from distar.tracking.runs import TrainingRun

    def register(uri: str, *overrides: str, steps: int = 2):
        out = tmp_path_factory.mktemp("toy-run")
        cfg = load_config(None, [f"run.output_dir={out}", f"run.steps={steps}", "data.batch_size=4", f"tracking.mlflow_uri={uri}",
                                 "tracking.grid_every=1", "run.log_every=1", *overrides])
        with TrainingRun(cfg) as tracked:
            return tracked.register(train(cfg, tracked.target, log=lambda line: None))

    return register
