"""What running on Ray costs against the single-process baseline, measured side by side.

    python bench/ray_overhead.py [--steps N] [--workers W]

Runs the embedded default run (the shapes world) for N steps twice, one after the other, as a
user would: `jobs/train.py --in-process` and `jobs/train.py` on a local Ray instance it starts
(Serve pools, W Ray Train workers sharing the same global batch). Prints each one's training rate (from
its last step line), wall time including start-up, and the ratios Ray / in-process.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distar.config import RunConfig  # noqa: E402


def timed_run(args: list[str]) -> tuple[float, float]:
    """(steps/s of the training loop, wall seconds of the whole job)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "jobs/train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"jobs/train.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    rates = re.findall(r"\| ([\d.]+) step/s \|", proc.stdout)
    return float(rates[-1]), wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--set", f"run.steps={a.steps}", "--set", f"run.log_every={a.steps}"]
        base_rate, base_wall = timed_run([*common, "--set", f"run.output_dir={tmp}/in_process", "--in-process"])
        per_worker = RunConfig().data.batch_size // a.workers  # the same global batch, split over the workers
        ray_rate, ray_wall = timed_run([*common, "--set", f"run.output_dir={tmp}/ray", "--set", f"cluster.trainer_workers={a.workers}",
                                        "--set", f"data.batch_size={per_worker}"])
    print(f"default run, {a.steps} steps of a global batch of {RunConfig().data.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'':<28}{'steps/s':>10}{'wall s':>10}")
    print(f"{'in-process':<28}{base_rate:>10.2f}{base_wall:>10.1f}")
    print(f"{f'Ray, {a.workers} trainer worker(s)':<28}{ray_rate:>10.2f}{ray_wall:>10.1f}")
    print(f"ratio Ray / in-process: training rate {ray_rate / base_rate:.2f}x, wall time {ray_wall / base_wall:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
