"""The generator endpoint (distar/serving.py) as users start it: `serve run <config file>` and
`serve run distar.serving:app model=...` on a real Ray cluster, serving a model from a real MLflow
registry that takes a login, hit with valid and concurrent requests; then against hostile
requests and clients: malformed, oversized and out-of-range bodies, slow bodies that would hold
the replica, more requests than it queues, and a chunked body without end. Each gets its status;
/healthz answers throughout; valid requests succeed after. One served app for the whole file."""

import base64
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
import requests

from distar.serving import MAX_BODY_BYTES, MAX_PROMPT_CHARS, MAX_SEED, GenerateRequest, ServeArgsError, app
from serving_app import LOGIN_SECRET, MAX_IMAGES, NAME, PROMPT, SERVE, SLOW_CLIENT_ARGS, ServeRun, pixels, post

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


# --- a running app (the served fixture: serving_app.py) -------------------------------------------


@pytest.mark.slow
def test_healthz_reports_the_pinned_version(served):
    health = requests.get(f"{served['url']}/healthz", timeout=10).json()
    assert health == served["health"]
    assert health["status"] == "ok" and health["name"] == NAME and health["version"] == served["version"]
    assert health["model"] == f"models:/{NAME}/{served['version']}"  # the alias was resolved when the app was built


@pytest.mark.slow
def test_valid_requests_return_the_models_images(served, tmp_path, monkeypatch):
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
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", LOGIN_SECRET)
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
def test_serve_run_import_path_form(served, mlflow_client, monkeypatch):
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
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", LOGIN_SECRET)
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


# --- hostile requests and clients -----------------------------------------------------------------

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


def _status(sock) -> int | None:
    """The status code of the response waiting on `sock`, if one has come (never blocks)."""
    import select

    if not select.select([sock], [], [], 0)[0]:
        return None
    try:
        head = sock.recv(64)
    except OSError:
        return -1  # reset before a response could be read
    return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else -1


def _healthz_s(url: str) -> float:
    start = time.perf_counter()
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    return time.perf_counter() - start


@pytest.mark.slow
def test_slow_bodies_time_out_excess_requests_get_429_and_healthz_keeps_answering(served):
    import socket

    limit, timeout_s, extra = SLOW_CLIENT_ARGS["max_queued_requests"], SLOW_CLIENT_ARGS["request_timeout_s"], 8
    head = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{"
    socks, statuses, slowest = [], {}, 0.0
    try:
        for _ in range(limit + extra):  # a declared 16 KB body, sent a byte every half second
            socks.append(socket.create_connection(("127.0.0.1", served["port"]), timeout=10))
            socks[-1].sendall(head)
        deadline = time.time() + timeout_s + 5
        while time.time() < deadline and len(statuses) < len(socks):
            for i, sock in enumerate(socks):
                if i not in statuses and (status := _status(sock)) is not None:
                    statuses[i] = status
                elif i not in statuses:
                    sock.send(b" ")
            slowest = max(slowest, _healthz_s(served["url"]))
            time.sleep(0.5)
    finally:
        for sock in socks:
            sock.close()
    assert sorted(statuses.values()) == [408] * limit + [429] * extra, statuses
    assert slowest < 1.0  # /healthz answered within a second throughout
    ok = post(served["url"], {"prompt": PROMPT, "seed": 5})
    assert ok.status_code == 200 and pixels(ok.content).shape == (32, 32, 3)


@pytest.mark.slow
def test_a_huge_chunked_body_is_cut_off_and_the_app_keeps_serving(served):
    import socket
    import threading

    sock, slowest = socket.create_connection(("127.0.0.1", served["port"]), timeout=30), []
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))

    def send():  # 256 MiB of chunked body, as fast as the server takes it
        try:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(256):
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: what should happen

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while sender.is_alive() and len(slowest) < 120:
        slowest.append(_healthz_s(served["url"]))
        time.sleep(0.25)
    sender.join(timeout=30)
    try:
        answer = sock.recv(64)
    except OSError:
        answer = b""  # reset once refused
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") or answer == b"", answer  # refused past 16 KiB (or reset once refused)
    assert max(slowest, default=0) < 1.0
    assert post(served["url"], {"prompt": PROMPT, "seed": 6}).status_code == 200
