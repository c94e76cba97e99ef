"""The generator endpoint as the serving tests start it: a toy generator registered in an MLflow
registry that takes a login, served by `serve run` of cluster_configs/serve.yaml on a Ray cluster
of the test module's own, and the requests they send it."""

import contextlib
import io
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SERVE = str(Path(sys.executable).parent / "serve")
NAME = "serve-test"
MAX_IMAGES = 8  # the config's max_batch_size
PROMPT = "a small red circle on the left"
LOGIN_SECRET = "registry-login-9f2c51e0"
SLOW_CLIENT_ARGS = {"max_queued_requests": 40, "request_timeout_s": 5}  # what the slow-client test fills and outlasts
FAILED = ("Failed to update the deployments", "Exception importing application", "failed with exception")  # Serve's log when an app cannot start


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def post(url: str, body, **kw) -> requests.Response:
    return requests.post(f"{url}/generate", json=body, timeout=60, **kw)


class ServeRun:
    """`serve run ARGS...` in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path, cwd: Path, servers):
        self.log, self.servers = log, servers
        self.proc = servers.start([SERVE, "run", *args], log, env, cwd)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def wait_healthy(self, url: str, timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}:\n{self.tail()}")
            if any(failed in self.log.read_text() for failed in FAILED):
                raise RuntimeError(f"the app failed to deploy:\n{self.tail()}")
            with contextlib.suppress(requests.RequestException):  # not listening yet while the app deploys
                r = requests.get(f"{url}/healthz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            time.sleep(1)
        raise TimeoutError(f"{url}/healthz did not answer within {timeout} s:\n{self.tail()}")

    def stop(self, timeout: float = 60):
        """Ctrl-C, as a user stops it: serve run then shuts Serve down on the cluster."""
        if self.proc.poll() is None:
            self.servers.stop(self.proc, timeout=timeout, sig=signal.SIGINT)


@pytest.fixture(scope="module")
def served(tmp_path_factory, new_mlflow_server, register_toy_generator, new_ray_cluster, mlflow_client, servers, free_port):
    """A generator registered as NAME with alias champion, served by `serve run` of a copy of
    cluster_configs/serve.yaml (a free port, this registry) on a Ray cluster of this module's own.
    The registry takes a login (MLflow's basic-auth app), named in the config's tracking_uri: the
    replicas, which run on the cluster, get it only from the app."""
    root = tmp_path_factory.mktemp("serving")
    registry_server, cluster, run = new_mlflow_server(root, admin=("admin", LOGIN_SECRET)), new_ray_cluster(root), None
    try:
        version = register_toy_generator(registry_server.login, f"tracking.registered_model={NAME}")
        with pytest.MonkeyPatch.context() as env_here:  # this process's client, as a user's shell would carry the login
            env_here.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            env_here.setenv("MLFLOW_TRACKING_PASSWORD", LOGIN_SECRET)
            mlflow_client(registry_server.uri).set_registered_model_alias(NAME, "champion", version.version)
        config = yaml.safe_load((ROOT / "cluster_configs/serve.yaml").read_text())
        port = free_port()
        config["http_options"]["port"] = port
        config["applications"][0]["args"].update(model=f"models:/{NAME}@champion", tracking_uri=registry_server.login, **SLOW_CLIENT_ARGS)
        (root / "serve.yaml").write_text(yaml.safe_dump(config))
        env = {**cluster.run_env, "MLFLOW_TRACKING_URI": registry_server.uri, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": LOGIN_SECRET}
        run = ServeRun([str(root / "serve.yaml")], env, root / "serve_run.log", root, servers)
        url = f"http://127.0.0.1:{port}"
        health = run.wait_healthy(url)
        yield {"url": url, "health": health, "version": int(version.version), "env": env, "root": root, "mlflow": registry_server.uri,
               "servers": servers, "port": port}
    finally:
        cluster.stop()  # the app goes with its cluster: serve run, left with nothing to shut down, is killed
        if run is not None and run.proc.poll() is None:
            servers.stop(run.proc, timeout=10, sig=signal.SIGKILL)
        registry_server.stop()
