"""What the tests share, as fixtures: tiny models, one runner of the jobs, free ports, and the real
servers the slow tests start (a Ray cluster, an MLflow server), each in a process group of its
own and ended by that group, never by name.

Tests marked `slow` start a server, a Ray instance or a training run (a job that trains, or the
run loop); `make test-fast` leaves them out, and a test that is not marked may not do either.
"""

import os

# Tests never reach a model hub: every model is built from a config and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and OpenMP spin-waits slow them ~100x when
# another process (a Ray worker, a second test) holds the other core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from cluster_runs import start  # noqa: E402,F401 -- the fixture of training jobs in the background
from distar.cluster.session import free_port as _free_port  # noqa: E402
from distar.models import tiny  # noqa: E402
from serving_app import served  # noqa: E402,F401 -- the served generator (one per test module that uses it)
from zero3_here import _gloo_rank, deepspeed_here  # noqa: E402,F401 -- fixtures, shared from their own module

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


SLOW_FIXTURES = {"ray_cluster", "new_ray_cluster", "mlflow_server", "new_mlflow_server", "register_toy_generator", "servers", "deepspeed_here"}


@pytest.fixture(autouse=True)
def _slow_work_is_marked(request, monkeypatch):
    """The fast tier stays fast: a test not marked slow may not start a server, a Ray instance or
    the run loop, and may not use the fixtures that do."""
    if request.node.get_closest_marker("slow"):
        return
    used = SLOW_FIXTURES & set(request.fixturenames)
    if used:
        pytest.fail(f"uses {', '.join(sorted(used))} but is not marked slow")

    def refuse(what):
        def refused(*args, **kwargs):
            pytest.fail(f"starts {what} but is not marked slow")
        return refused

    monkeypatch.setattr("distar.run.loop.RunLoop.run", refuse("a training run"))
    monkeypatch.setattr("ray.init", refuse("a Ray instance"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Built-in sources (`tiny-random`) materialise under the test's own folder."""
    monkeypatch.setenv("DISTAR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def free_port():
    """`free_port()`: a port nothing listens on, on 127.0.0.1."""
    return _free_port


@pytest.fixture(scope="session")
def mlflow_client():
    """`mlflow_client(uri)`: a client of that store for runs and the registry alike."""
    from distar.tracking.store import Store

    return lambda uri: Store(uri).client()


def requires(program: str, install: str) -> str:
    """The path of an outside program a test runs, or a skip that says how to install it."""
    found = shutil.which(program)
    if found is None:
        pytest.skip(f"needs `{program}`, which is not installed here ({install}; `make test` installs it)")
    return found


@pytest.fixture(scope="session")
def program():
    """`program(name, install)`: see `requires`."""
    return requires


class Jobs:
    """The jobs (jobs/*.py) as a user runs them: a fresh interpreter in the checkout, finding the
    package by itself (no PYTHONPATH), with this session's environment unless told otherwise."""

    def command(self, script: str, *args: str) -> list[str]:
        return [sys.executable, str(ROOT / "jobs" / script), *map(str, args)]

    def env(self, env: dict | None) -> dict:
        return {**(os.environ if env is None else env), "PYTHONPATH": ""}

    def run(self, script: str, *args, env: dict | None = None, cwd=ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(script, *args), cwd=cwd, env=self.env(env), capture_output=True, text=True, timeout=timeout)

    def start(self, script: str, *args, env: dict | None = None, cwd=ROOT, **popen) -> subprocess.Popen:
        """In the background, output merged into stdout (a pipe); its own process group."""
        return subprocess.Popen(self.command(script, *args), cwd=cwd, env=self.env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


@pytest.fixture(scope="session")
def jobs():
    return Jobs()


def stop_group(proc, timeout: float, sig: int = signal.SIGTERM) -> None:
    """End what a test started in its own process group: `sig` to the group, SIGKILL if it is
    still there after `timeout` s."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Servers:
    """Programs started in process groups of their own, ended by group (see `stop_group`)."""

    def start(self, args: list[str], log: Path, env: dict | None = None, cwd=None) -> subprocess.Popen:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    stop = staticmethod(stop_group)

    @staticmethod
    def answers(url: str) -> bool:
        """Whether `url` answers 200 now."""
        import requests

        try:
            return requests.get(url, timeout=3).status_code == 200
        except requests.RequestException:
            return False

    @staticmethod
    def wait(what: str, ready, proc, timeout: float, every: float = 0.5) -> None:
        """Until `ready()` is true (bounded by `timeout`); fails early if `proc` exits."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
            if ready():
                return
            time.sleep(every)
        raise TimeoutError(f"{what}: not ready within {timeout} s")


@pytest.fixture(scope="session")
def servers():
    return Servers()


class RayCluster:
    """A real single-node Ray cluster: `ray start --head --block` in its own process group."""

    def __init__(self, root: Path, env: dict | None = None):
        self.port, self.dashboard_port, self.metrics_port = _free_port(), _free_port(), _free_port()
        self.address, self.dashboard = f"127.0.0.1:{self.port}", f"http://127.0.0.1:{self.dashboard_port}"
        # Token auth as Ray 2.60 sets it up by default, with a token of this cluster's own.
        self.env = {**(env or os.environ), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "DISTAR_CACHE": str(root / "cache"), "RAY_metrics_report_interval_ms": "1000",
                    "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": "",
                    "RAY_API_SERVER_ADDRESS": self.dashboard}  # not the address file of whichever cluster started last
        self.proc = Servers().start(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--num-cpus=4", "--disable-usage-stats",
             f"--ray-client-server-port={_free_port()}", f"--metrics-export-port={self.metrics_port}"],
            root / "ray_head.log", self.env)
        self.run_env = {**self.env, "RAY_ADDRESS": self.address}
        try:
            Servers.wait("the Ray head", self._answers, self.proc, timeout=120, every=2)
        except BaseException:  # the caller gets no object to stop
            self.stop()
            raise

    def _answers(self) -> bool:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", self.dashboard], env=self.env, capture_output=True, timeout=60)
        return probe.returncode == 0

    def stop(self):
        stop_group(self.proc, timeout=5)  # not the head's 30 s drain: nothing to save; workers exit with their raylet


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The session's Ray cluster, shared by every test that needs one but no cluster of its own."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def new_ray_cluster():
    """`new_ray_cluster(root, env=None)`: a cluster of a module's own (stop() it when done)."""
    return RayCluster


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend, in its own process group. By
    default it serves artifacts from a folder; `artifacts` replaces the server's artifact options
    (e.g. an s3:// destination, with the endpoint and credentials in `env`). `admin=(user, password)`
    turns on MLflow's basic-auth app: every request needs that login (`login` is the URI with it)."""

    def __init__(self, root: Path, artifacts: tuple[str, ...] = (), env: dict | None = None, admin: tuple[str, str] | None = None):
        self.uri = f"http://127.0.0.1:{_free_port()}"
        port, auth = self.uri.rsplit(":", 1)[1], []
        if admin:
            (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{root}/auth.db\nadmin_username = "
                                           f"{admin[0]}\nadmin_password = {admin[1]}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            env = {**(env or os.environ), "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
            auth = ["--app-name", "basic-auth"]
            self.login = self.uri.replace("://", f"://{admin[0]}:{admin[1]}@")
        self.proc = Servers().start(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", port, "--workers", "1", *auth,
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", *(artifacts or ("--artifacts-destination", str(root / "artifacts")))],
            root / "mlflow_server.log", env)

        try:
            Servers.wait(f"mlflow server (see {root / 'mlflow_server.log'})", lambda: Servers.answers(self.uri + "/health"), self.proc, timeout=90)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        stop_group(self.proc, timeout=20)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def new_mlflow_server():
    """`new_mlflow_server(root, artifacts=(), env=None)`: a server of a test's own (stop() it when done)."""
    return MlflowServer


@pytest.fixture(scope="session")
def register_toy_generator(tmp_path_factory):
    """Train a toy-world generator for a few steps in-process, tracked into an MLflow store, and
    register it as jobs/train.py does; returns the model version."""
    from distar.config import load_config
    from distar.run.in_process import train
    from distar.tracking.runs import TrainingRun

    def register(uri: str, *overrides: str, steps: int = 2):
        out = tmp_path_factory.mktemp("toy-run")
        cfg = load_config(None, [f"run.output_dir={out}", f"run.steps={steps}", "data.batch_size=4", f"tracking.mlflow_uri={uri}",
                                 "tracking.grid_every=1", "run.log_every=1", *overrides])
        with TrainingRun(cfg) as tracked:
            return tracked.register(train(cfg, tracked.target, log=lambda line: None).exported())

    return register


@pytest.fixture(scope="session")
def pyproject():
    """The project's version, its image tag, and its runtime dependencies' lower bounds (the pins the image and cluster configs must carry)."""
    import re
    import tomllib
    from types import SimpleNamespace

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", dep.split(";")[0])
        assert m, f"pyproject dependency without a plain >= lower bound: {dep!r}"
        bounds[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return SimpleNamespace(version=project["version"], image=f"ghcr.io/distar-ai/distar:{project['version']}", lower_bounds=bounds,
                           requires_python=project["requires-python"])

