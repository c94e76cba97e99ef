"""The generator endpoint (distar/serving.py) as users start it: `serve run <config file>` and
`serve run distar.serving:app model=...` on a real Ray cluster, serving a model from a real MLflow
registry, hit with real HTTP requests: valid, hostile and concurrent ones."""

import base64
import io
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from distar.serving import MAX_BODY_BYTES, MAX_PROMPT_CHARS, MAX_SEED, GenerateRequest, ServeArgsError, app

ROOT = Path(__file__).resolve().parents[1]
SERVE = str(Path(sys.executable).parent / "serve")
NAME = "serve-test"
MAX_IMAGES = 8  # the config's max_batch_size
PROMPT = "a small red circle on the left"
FAILED = ("Failed to update the deployments", "Exception importing application", "failed with exception")  # Serve's log when an app cannot start


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def post(url: str, body, **kw) -> requests.Response:
    return requests.post(f"{url}/generate", json=body, timeout=60, **kw)


# --- without a cluster: the builder's arguments and the request model ---------------------------


@pytest.mark.parametrize("args, field", [({}, "model"), ({"model": "x", "replicas": 2}, "replicas"), ({"model": "x", "max_batch_size": 0}, "max_batch_size"),
                                         ({"model": "x", "num_cpus": "many"}, "num_cpus")])
def test_bad_app_args_name_the_argument(args, field):
    with pytest.raises(ServeArgsError, match=f"serve args: {field}: "):
        app(args)


def test_app_args_model_must_exist(tmp_path):
    with pytest.raises(ServeArgsError, match="model: .*neither a folder"):
        app({"model": str(tmp_path / "missing")})


def test_request_model_is_strict():
    ok = GenerateRequest.model_validate({"prompt": "a", "seed": MAX_SEED, "num_images": MAX_IMAGES}, context={"max_images": MAX_IMAGES})
    assert (ok.seed, ok.num_images) == (MAX_SEED, MAX_IMAGES)
    for bad in ({"prompt": "a", "seed": True}, {"prompt": "a", "num_images": 2.0}, {"prompt": 5}, {"prompt": "a", "seed": "1"}):
        with pytest.raises(ValueError):
            GenerateRequest.model_validate(bad, context={"max_images": MAX_IMAGES})


# --- a running app ------------------------------------------------------------------------------


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
            try:
                r = requests.get(f"{url}/healthz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"{url}/healthz did not answer within {timeout} s:\n{self.tail()}")

    def stop(self):
        """Ctrl-C, as a user stops it: serve run then shuts Serve down on the cluster."""
        if self.proc.poll() is None:
            self.servers.stop(self.proc, timeout=60, sig=signal.SIGINT)


@pytest.fixture(scope="module")
def served(tmp_path_factory, mlflow_server, register_toy_generator, new_ray_cluster, mlflow_client, servers, free_port):
    """A generator registered as NAME with alias champion, served by `serve run` of a copy of
    cluster_configs/serve.yaml (a free port, this registry) on a Ray cluster of this module's own."""
    root = tmp_path_factory.mktemp("serving")
    cluster = new_ray_cluster(root)
    run = None
    try:
        version = register_toy_generator(mlflow_server.uri, f"tracking.registered_model={NAME}")
        mlflow_client(mlflow_server.uri).set_registered_model_alias(NAME, "champion", version.version)
        config = yaml.safe_load((ROOT / "cluster_configs/serve.yaml").read_text())
        port = free_port()
        config["http_options"]["port"] = port
        config["applications"][0]["args"].update(model=f"models:/{NAME}@champion", tracking_uri=mlflow_server.uri)
        (root / "serve.yaml").write_text(yaml.safe_dump(config))
        env = {**cluster.run_env, "MLFLOW_TRACKING_URI": mlflow_server.uri}
        run = ServeRun([str(root / "serve.yaml")], env, root / "serve_run.log", root, servers)
        url = f"http://127.0.0.1:{port}"
        health = run.wait_healthy(url)
        yield {"url": url, "health": health, "version": int(version.version), "env": env, "root": root, "mlflow": mlflow_server.uri,
               "servers": servers}
    finally:
        if run is not None:
            run.stop()
        cluster.stop()


@pytest.mark.slow
def test_healthz_reports_the_pinned_version(served):
    health = requests.get(f"{served['url']}/healthz", timeout=10).json()
    assert health == served["health"]
    assert health["status"] == "ok" and health["name"] == NAME and health["version"] == served["version"]
    assert health["model"] == f"models:/{NAME}/{served['version']}"  # the alias was resolved when the app was built


@pytest.mark.slow
def test_valid_requests_return_the_models_images(served, tmp_path):
    from distar.images import to_uint8
    from distar.tracking import registry

    url = served["url"]
    one = post(url, {"prompt": PROMPT, "seed": 7})
    assert one.status_code == 200, one.text
    assert one.headers["content-type"] == "image/png" and one.headers["x-seed"] == "7"
    image = pixels(one.content)
    assert image.shape == (32, 32, 3)
    assert post(url, {"prompt": PROMPT, "seed": 7}).content == one.content  # the same seed, the same bytes

    three = post(url, {"prompt": PROMPT, "seed": 7, "num_images": 3})
    assert three.status_code == 200 and three.headers["content-type"] == "application/json"
    body = three.json()
    assert body["seeds"] == [7, 8, 9] and len(body["images"]) == 3
    images = [pixels(base64.b64decode(b)) for b in body["images"]]
    assert np.array_equal(images[0], image) and not np.array_equal(images[1], image)

    # The same pixels as the registered model opened in this process (its pyfunc's Sampler),
    # downloaded without pointing this process's MLflow at the test server.
    folder = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{served['version']}", dst_path=str(tmp_path / "model"),
                                                 tracking_uri=served["mlflow"], registry_uri=served["mlflow"])
    model = registry.load(folder).model
    expected = to_uint8(model.generate([PROMPT] * 3, [7, 8, 9]))
    for got, want in zip(images, expected):
        assert np.array_equal(got, want)

    unseeded = post(url, {"prompt": PROMPT})  # a random seed, returned so the image can be remade
    seed = int(unseeded.headers["x-seed"])
    assert 0 <= seed <= MAX_SEED and post(url, {"prompt": PROMPT, "seed": seed}).content == unseeded.content

    # The limits themselves are accepted.
    assert post(url, {"prompt": "x" * MAX_PROMPT_CHARS, "seed": MAX_SEED}).status_code == 200
    most = post(url, {"prompt": PROMPT, "seed": 0, "num_images": MAX_IMAGES})
    assert most.status_code == 200 and len(most.json()["images"]) == MAX_IMAGES


JSON = {"Content-Type": "application/json"}
HOSTILE = {  # name: (requests.request kwargs, expected status, word the reason must contain)
    "prompt of 1 MB": ({"json": {"prompt": "x" * 2**20}}, 413, "body"),
    "prompt of 1001 characters": ({"json": {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}}, 422, "prompt"),
    "empty prompt": ({"json": {"prompt": ""}}, 422, "prompt"),
    "blank prompt": ({"json": {"prompt": " \n\t "}}, 422, "prompt"),
    "no prompt": ({"json": {"seed": 1}}, 422, "prompt"),
    "prompt not a string": ({"json": {"prompt": ["a", "b"]}}, 422, "prompt"),
    "num_images 10**6": ({"json": {"prompt": PROMPT, "num_images": 10**6}}, 422, "num_images"),
    "num_images 0": ({"json": {"prompt": PROMPT, "num_images": 0}}, 422, "num_images"),
    "num_images true": ({"json": {"prompt": PROMPT, "num_images": True}}, 422, "num_images"),
    "num_images 2.5": ({"json": {"prompt": PROMPT, "num_images": 2.5}}, 422, "num_images"),
    "negative seed": ({"json": {"prompt": PROMPT, "seed": -1}}, 422, "seed"),
    "seed 2**40": ({"json": {"prompt": PROMPT, "seed": 2**40}}, 422, "seed"),
    "seed as a string": ({"json": {"prompt": PROMPT, "seed": "7"}}, 422, "seed"),
    "extra field": ({"json": {"prompt": PROMPT, "steps": 1000}}, 422, "steps"),
    "content type text/plain": ({"data": json.dumps({"prompt": PROMPT}), "headers": {"Content-Type": "text/plain"}}, 415, "content-type"),
    "no content type": ({"data": json.dumps({"prompt": PROMPT}).encode()}, 415, "content-type"),
    "form-encoded": ({"data": {"prompt": PROMPT}}, 415, "content-type"),
    "broken JSON": ({"data": '{"prompt": "a red', "headers": JSON}, 400, "JSON"),
    "not UTF-8": ({"data": b'{"prompt": "\xff\xfe"}', "headers": JSON}, 400, "JSON"),
    "JSON array": ({"data": json.dumps([{"prompt": PROMPT}]), "headers": JSON}, 400, "object"),
    "JSON nested 8000 deep": ({"data": "[" * 8000 + "]" * 8000, "headers": JSON}, 400, "JSON"),
    "body over the limit": ({"data": b" " * (MAX_BODY_BYTES + 1) + b"{}", "headers": JSON}, 413, "body"),
    "GET /generate": ({"method": "GET"}, 405, "Method Not Allowed"),
    "unknown path": ({"method": "POST", "path": "/admin", "json": {"prompt": PROMPT}}, 404, "Not Found"),
}


@pytest.mark.slow
def test_hostile_requests_get_4xx_and_the_app_keeps_serving(served):
    url, wrong = served["url"], []
    for name, (kwargs, status, word) in HOSTILE.items():
        kwargs = dict(kwargs)
        method, path = kwargs.pop("method", "POST"), kwargs.pop("path", "/generate")
        r = requests.request(method, url + path, timeout=60, **kwargs)
        reason = r.json().get("error", "") if r.headers.get("content-type") == "application/json" else ""
        if r.status_code != status or word not in reason:
            wrong.append(f"{name}: {r.status_code} {r.text[:200]!r}")
    assert not wrong, "\n".join(wrong)
    assert len(HOSTILE) >= 10
    after = post(url, {"prompt": PROMPT, "seed": 3})
    assert after.status_code == 200 and pixels(after.content).shape == (32, 32, 3)
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"


@pytest.mark.slow
def test_concurrent_requests_are_batched(served):
    def one(seed: int) -> tuple[int, np.ndarray, int]:
        r = post(served["url"], {"prompt": PROMPT, "seed": seed})
        return r.status_code, pixels(r.content) if r.status_code == 200 else None, int(r.headers.get("x-batch-size", 0))

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(100, 132)))
    assert [status for status, _, _ in results] == [200] * 32
    assert all(image.shape == (32, 32, 3) for _, image, _ in results)
    assert max(batch for _, _, batch in results) > 1  # some requests shared a generator call
    assert all(batch <= MAX_IMAGES for _, _, batch in results)


@pytest.mark.slow
def test_serve_run_import_path_form(served, mlflow_client):
    env, root = served["env"], served["root"]
    # Bad arguments fail in the builder, before anything is deployed, naming the argument.
    missing, unknown = (subprocess.Popen([SERVE, "run", "distar.serving:app", *args], env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                        for args in ([], ["model=models:/no-such-model@champion"]))
    try:
        out_missing, out_unknown = missing.communicate(timeout=120)[0], unknown.communicate(timeout=120)[0]
    finally:
        for proc in (missing, unknown):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert missing.returncode != 0 and "serve args: model: Field required" in out_missing, out_missing[-3000:]
    assert unknown.returncode != 0 and "no-such-model@champion: not in the registry" in out_unknown, out_unknown[-3000:]

    # Move the alias to a new version (the same weights): the running app keeps the version it
    # was built with; an app built now gets the new one.
    client = mlflow_client(served["mlflow"])
    second = client.copy_model_version(f"models:/{NAME}/{served['version']}", NAME)
    client.set_registered_model_alias(NAME, "champion", second.version)

    # The good form, as a second app beside the config file's on the same Serve instance.
    # MLFLOW_TRACKING_URI comes from the environment; the alias is pinned here, in the CLI.
    cli = ServeRun(["--non-blocking", "--name", "cli", "--route-prefix", "/cli", "distar.serving:app", f"model=models:/{NAME}@champion",
                    "max_batch_size=4"], env, root / "serve_run_cli.log", root, served["servers"])
    try:
        assert cli.proc.wait(timeout=240) == 0, cli.tail()
    finally:
        cli.stop()
    health = requests.get(f"{served['url']}/cli/healthz", timeout=10).json()  # serve run returned once the app was running
    assert (health["name"], health["version"], health["max_batch_size"]) == (NAME, int(second.version), 4)
    assert requests.get(f"{served['url']}/healthz", timeout=10).json()["version"] == served["version"]
    r = post(f"{served['url']}/cli", {"prompt": PROMPT, "seed": 7})
    assert r.status_code == 200 and r.content == post(served["url"], {"prompt": PROMPT, "seed": 7}).content
