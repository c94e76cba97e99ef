"""One set of pools for every trial of a sweep against one set per trial, measured in one run.

    python bench/sweep_sharing.py [--trials 4] [--steps 20]

Runs the same sweep twice, one after the other, as a user would (`jobs/sweep.py` on a local Ray
instance it starts): N toy trials over the reward weight, all N at once, first with the shared
pools, then with `--pools-per-trial`. Prints each one's wall time (start-up included) and the
peak resident memory of all pool replicas together (sampled every 0.2 s), and the ratios
per-trial / shared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
REPLICA = "ray::ServeReplica:distar-"  # the process title of a pool replica


def pool_memory_mb() -> float:
    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.info["cmdline"] and proc.info["cmdline"][0].startswith(REPLICA):
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def timed_sweep(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak MB of all pool replicas) of one jobs/sweep.py run."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.2):
            peak[0] = max(peak[0], pool_memory_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "jobs/sweep.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"jobs/sweep.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, peak[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    space = {"search": {"algorithm": "random", "num_samples": a.trials, "max_concurrent": a.trials, "seed": 0},
             "scheduler": {"kind": "fifo", "metric": "val/pref"}, "parameters": {"rewards.0.weight": {"uniform": [0.5, 2.0]}}}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "space.yaml").write_text(yaml.safe_dump(space))
        for name, extra in (("shared pools", []), ("pools per trial", ["--pools-per-trial"])):
            out = Path(tmp) / name.replace(" ", "_")
            settings = [f"run.output_dir={out}", f"run.steps={a.steps}", f"run.validate_every={a.steps}", f"run.log_every={a.steps}",
                        "data.batch_size=4", f"tracking.mlflow_uri=sqlite:///{out}.db"]
            rows[name] = timed_sweep(["--space", str(Path(tmp) / "space.yaml"), *extra, *(x for s in settings for x in ("--set", s))])
    print(f"{a.trials} concurrent toy trials of {a.steps} steps (batch 4), {os.cpu_count()} CPUs")
    print(f"{'':<18}{'wall s':>10}{'pool MB':>10}")
    for name, (wall, mb) in rows.items():
        print(f"{name:<18}{wall:>10.1f}{mb:>10.0f}")
    (shared_wall, shared_mb), (own_wall, own_mb) = rows["shared pools"], rows["pools per trial"]
    print(f"ratio per-trial / shared: wall time {own_wall / shared_wall:.2f}x, pool memory {own_mb / shared_mb:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
