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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Built-in sources (`tiny-random`) materialise under the test's own folder."""
    monkeypatch.setenv("DISTAR_CACHE", str(tmp_path / "cache"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                    "DISTAR_CACHE": str(root / "cache"), "RAY_metrics_report_interval_ms": "1000", "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": ""}
        self.proc = subprocess.Popen(
            [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--num-cpus=4", "--disable-usage-stats",
             f"--ray-client-server-port={_free_port()}", f"--metrics-export-port={self.metrics_port}"],
            env=self.env, stdout=open(root / "ray_head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.run_env = {**self.env, "RAY_ADDRESS": self.address}
        self._wait_ready()

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
        import signal
        import subprocess

        os.killpg(self.proc.pid, signal.SIGTERM)  # the head drains for up to 30 s
        try:
            self.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    yield cluster
    cluster.stop()
