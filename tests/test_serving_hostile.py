"""The generator endpoint against hostile requests and clients: malformed, oversized and
out-of-range bodies, slow bodies that would hold the replica, more requests than it queues, and
a chunked body without end. Each gets its status; /healthz answers throughout; valid requests
succeed after."""

import json
import time

import pytest
import requests

from distar.serving import MAX_BODY_BYTES, MAX_PROMPT_CHARS
from serving_app import PROMPT, SLOW_CLIENT_ARGS, pixels, post

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
