"""The trainer step's peak memory with gradient checkpointing against without, measured side by side.

    python bench/memory.py [--resolution PX] [--batch B] [--dtype float32|bfloat16]

One DI* step (fake-score update, generator update with the reward and reference backward passes)
of the tiny SD1.5-structured models in one process, at a resolution where activations outweigh
the tiny weights. Each setting runs in a fresh process (an allocator that kept the first run's
memory would flatter the second); memory is the peak RSS rise during the step, sampled every
2 ms (distar.evaluation.measure.PeakMemory). Prints both and the ratio on / off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_step(resolution: int, batch: int, dtype: str, checkpointing: bool) -> dict:
    import torch

    from distar.config import load_config
    from distar.evaluation.measure import PeakMemory
    from distar.run.in_process import run_loop

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(ROOT / "jobs/configs/smoke.yaml", [
            f"model.resolution={resolution}", f"data.batch_size={batch}", f"model.dtype={dtype}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}", f"run.output_dir={out}",
            f"cluster.reward_pool.max_batch_size={batch}", f"cluster.reference_pool.max_batch_size={batch}"])
        run = run_loop(cfg, log=lambda line: None)
        rng = torch.Generator().manual_seed(0)
        run.trainer.step(run.sampler.batch(0), rng)  # warm-up: lazily built state is not the step's
        with PeakMemory() as peak:
            values = run.trainer.step(run.sampler.batch(1), rng)
    return {"peak_mb": peak.mb, "loss": values["loss/generator"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process's single measurement
    a = p.parse_args()
    if a.one:
        print(json.dumps(one_step(a.resolution, a.batch, a.dtype, a.one == "on")))
        return 0
    found = {}
    for setting in ("off", "on"):
        args = [sys.executable, __file__, "--one", setting, "--resolution", str(a.resolution), "--batch", str(a.batch), "--dtype", a.dtype]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the {setting} run failed:\n{proc.stderr[-3000:]}")
        found[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"one trainer step, tiny SD1.5-structured models, {a.resolution} px, batch {a.batch}, {a.dtype}, CPU")
    print("| gradient checkpointing | peak RSS rise (MB) | generator loss |")
    print("| --- | --- | --- |")
    for setting in ("off", "on"):
        print(f"| {setting} | {found[setting]['peak_mb']:.0f} | {found[setting]['loss']:.4g} |")
    print(f"ratio on / off: {found['on']['peak_mb'] / found['off']['peak_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
