"""Images per second through the Serve endpoint against direct pipeline calls, in one run.

    python bench/serve_throughput.py [--model FOLDER] [--rounds N] [--repeats K] [--batch B]

Trains the embedded default run (the shapes world) for 2 steps in-process to get a one-step
generator (or takes --model, a diffusers or MLflow model folder), starts a local
Ray instance with the Serve app of distar/serving.py on a free 127.0.0.1 port (one replica, one
CPU, max_batch_size B, the default batch wait), and then alternates K times:

- direct: N calls of `Sampler.generate` on B prompts in this process, each image encoded to
  PNG as the endpoint does, with one torch thread as the replica has (num_cpus 1);
- served, rounds: N rounds of B concurrent single-image `POST /generate` requests, each round
  sent when the last one has been answered (so nothing overlaps the generator call);
- served, steady: 2B clients sending single-image requests back to back until N * B images
  came back (requests arrive while a batch computes, as under real load).

Serving adds a roughly fixed cost per request (HTTP proxy, Ray calls, the replica's event loop:
several ms of CPU on a small machine), so the ratio grows with the model's time per image: the
toy one-step generator at 32 px is the hardest case, the toy reference (`--model
platform/distar/toy/assets/reference`, 100 UNet calls per image) a contrasting one.

Clients keep one HTTP connection each. Prints images/s of each (medians over the K repeats, and
each repeat), the served / direct ratios against the 0.8 target, how full the replica's batches
were (its X-Batch-Size header), and the machine's load average, since other processes on a
small machine take CPU from the three processes serving (client, proxy, replica) more than from
the one direct.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance; no token written to ~/.ray

TARGET = 0.8
COLORS, SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "cross")
PROMPTS = [f"a {c} {s}" for c in COLORS for s in SHAPES]


def toy_generator(folder: Path) -> Path:
    from distar.config import load_config
    from distar.run.in_process import train

    return train(load_config(None, ["run.steps=2", "data.batch_size=4", f"run.output_dir={folder}", "run.name=bench-serve"]), log=lambda line: None).exported()


def direct(model, rounds: int, batch: int) -> float:
    """images/s of generate + PNG encoding on batches of `batch`."""
    from distar.images import to_uint8
    from distar.tracking.registry import png

    start = time.perf_counter()
    for r in range(rounds):
        seeds = list(range(r * batch, (r + 1) * batch))
        pngs = [png(x) for x in to_uint8(model.generate([PROMPTS[s % len(PROMPTS)] for s in seeds], seeds))]
        assert len(pngs) == batch
    return rounds * batch / (time.perf_counter() - start)


class Client:
    """One keep-alive connection per thread; `post(seed)` -> the replica's batch size."""

    def __init__(self, port: int):
        self.port, self.local = port, threading.local()

    def post(self, seed: int) -> int:
        if not hasattr(self.local, "conn"):
            self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        body = json.dumps({"prompt": PROMPTS[seed % len(PROMPTS)], "seed": seed})
        self.local.conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
        r = self.local.conn.getresponse()
        data = r.read()
        if r.status != 200 or not data.startswith(b"\x89PNG"):
            raise RuntimeError(f"POST /generate: {r.status} {data[:200]!r}")
        return int(r.getheader("X-Batch-Size"))


def rounds(client: Client, pool: ThreadPoolExecutor, n: int, batch: int, sizes: list[int]) -> float:
    """images/s of n rounds of `batch` concurrent one-image requests."""
    start = time.perf_counter()
    for r in range(n):
        sizes += pool.map(client.post, range(r * batch, (r + 1) * batch))
    return n * batch / (time.perf_counter() - start)


def steady(client: Client, clients: int, total: int, sizes: list[int]) -> float:
    """images/s of `clients` threads posting back to back until `total` images came back."""
    counter, lock = iter(range(total)), threading.Lock()

    def loop():
        while True:
            with lock:
                seed = next(counter, None)
            if seed is None:
                return
            sizes.append(client.post(seed))

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a generator folder, diffusers or MLflow model (default: train the toy run for 2 steps)")
    p.add_argument("--rounds", type=int, default=40, help="batches per measurement")
    p.add_argument("--repeats", type=int, default=3, help="alternations of the three measurements; medians are reported")
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()

    import ray
    import torch
    from ray import serve

    from distar.cluster.session import free_port
    from distar.serving import app
    from distar.tracking.registry import load
    from distar.tracking.store import resolve

    torch.set_num_threads(1)  # the replica's num_cpus
    load_before = os.getloadavg()[0]
    rates: dict[str, list[float]] = {"direct": [], "rounds": [], "steady": []}
    sizes: dict[str, list[int]] = {"rounds": [], "steady": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = a.model or str(toy_generator(Path(tmp) / "toy"))
        model = load(model_uri, resolve()).model
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            serve.run(app({"model": model_uri, "max_batch_size": a.batch, "num_cpus": 1}), name="bench", route_prefix="/")
            client = Client(port)
            with ThreadPoolExecutor(a.batch) as pool:
                direct(model, 5, a.batch), rounds(client, pool, 5, a.batch, []), steady(client, 2 * a.batch, 5 * a.batch, [])  # warm-up
                for _ in range(a.repeats):
                    rates["direct"].append(direct(model, a.rounds, a.batch))
                    rates["rounds"].append(rounds(client, pool, a.rounds, a.batch, sizes["rounds"]))
                    rates["steady"].append(steady(client, 2 * a.batch, a.rounds * a.batch, sizes["steady"]))
        finally:
            serve.shutdown()
            ray.shutdown()

    base = statistics.median(rates["direct"])
    print(f"model: {model_uri if a.model else 'one-step generator, toy run of 2 steps'}, {model.resolution} px, {model.network_calls} UNet call(s) per image; batch {a.batch}; "
          f"{a.rounds * a.batch} images per measurement x {a.repeats} repeats; {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    labels = {"direct": "direct: Sampler.generate + PNG, batches",
              "rounds": f"served, rounds of {a.batch} concurrent requests",
              "steady": f"served, {2 * a.batch} clients back to back"}
    print(f"| {'':<46} | {'images/s':>8} | {'each repeat':<22} | {'/ direct':>8} | {'mean batch':>10} |")
    print(f"| {'-' * 46} | {'-' * 7}: | {'-' * 22} | {'-' * 7}: | {'-' * 9}: |")
    for key, label in labels.items():
        median = statistics.median(rates[key])
        batch = f"{statistics.mean(sizes[key]):.1f}" if key in sizes else f"{a.batch}"
        print(f"| {label:<46} | {median:>8.1f} | {', '.join(f'{r:.3g}' for r in rates[key]):<22} | {median / base:>8.2f} | {batch:>10} |")
    for key in ("rounds", "steady"):
        ratio = statistics.median(rates[key]) / base
        added = 1000 * (1 / statistics.median(rates[key]) - 1 / base)
        print(f"{labels[key]}: {ratio:.2f} of direct (target {TARGET}: {'met' if ratio >= TARGET else 'NOT met'}); "
              f"{1000 / base:.1f} ms per image direct, serving adds {added:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
