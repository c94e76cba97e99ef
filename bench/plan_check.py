"""The memory plan's activation peaks against the memory the same work takes on CPU.

    python bench/plan_check.py [--set PATH=VALUE ...]

For each model (the tiny random SD1.5-structured models at 256 px, batch 4, and the shapes
world's at its 32 px, batch 8) and each role (distar.plan.peaks: trainer update, reference
replica, reward replica), in a fresh process: the plan's peak (torch's MemTracker over fake
tensors, which allocates nothing), then the same work on real tensors, run once to warm up and
measured three ways:
- allocated: the most torch's CPU allocator holds at once (distar.plan.peaks.allocated_peak,
  kernels' own buffers included): CPU's counterpart of CUDA's max_memory_allocated;
- resident: the rise of the process's resident memory, sampled every 2 ms
  (distar.evaluation.measure.PeakMemory), with glibc's malloc as it comes;
- resident, mmap >= 128 KiB: the same in a process started with glibc's mmap threshold fixed
  (MALLOC_MMAP_THRESHOLD_). By default glibc raises that threshold to the largest block freed so
  far, so a freed activation's memory stays on the heap, resident, where later blocks of other
  sizes do not always fit.
Then the trainer's loading peak (distar.plan.fit: the reference's parts with three float32
UNets, or the base and its adapters with model.lora), which decides the presets' trainer totals
and is a rule, not a fake-tensor run, against the same three measurements of the trainer's own
loading code (distar.plan.peaks.trainer_loading) on the tiny models, full fine-tuning and LoRA,
in float32 and bfloat16. Prints the three and the ratios planned / allocated and planned /
resident (mmap >= 128 KiB); issue 20's target is within 25% (0.75x to 1.25x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

TINY = ["model.reference=tiny-random", "rewards.0.source=tiny-random", "rewards.1.source=tiny-random"]
MODELS = {
    "tiny, 256 px, batch 4": [*TINY, "model.resolution=256", "data.batch_size=4", "cluster.reward_pool.max_batch_size=4",
                              "cluster.reference_pool.max_batch_size=4"],
    "shapes world, 32 px, batch 8": ["cluster.reward_pool.max_batch_size=8", "cluster.reference_pool.max_batch_size=8"],
}
ROLES = ("trainer", "reference", "reward")
LOADING = {
    "tiny, float32": TINY,
    "tiny, bfloat16": [*TINY, "model.dtype=bfloat16"],
    "tiny, LoRA rank 4, float32": [*TINY, "model.lora={rank: 4}"],
    "tiny, LoRA rank 4, bfloat16": [*TINY, "model.lora={rank: 4}", "model.dtype=bfloat16"],
}
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(128 * 2**10)}  # read by glibc at start; set, it is no longer adjusted


def resident_peak(work, held) -> int:
    """Bytes the resident memory rises by while `work` runs, after one warm-up run."""
    from distar.evaluation.measure import PeakMemory

    work()
    with PeakMemory() as peak:
        work()
    return int(peak.mb * 2**20)


def one(role: str, overrides: list[str]) -> dict:
    import torch

    from distar.config import load_config
    from distar.plan import architectures, peaks

    torch.set_num_threads(2)
    cfg = load_config(None, overrides)
    arch = architectures.architecture(cfg)
    if role == "trainer, loading":
        from distar.plan import fit

        return {"planned": fit.trainer_role(cfg, peaks.trainer(arch, cfg)).loading,
                "allocated": peaks.trainer_loading(cfg), "resident": peaks.trainer_loading(cfg, peak=resident_peak)}
    measure = getattr(peaks, role)
    return {"planned": measure(arch, cfg, fake=True).activations,
            "allocated": measure(arch, cfg, fake=False, peak=peaks.allocated_peak).activations,
            "resident": measure(arch, cfg, fake=False, peak=resident_peak).activations}


def in_child(role: str, model: str, overrides: list[str], env: dict) -> dict:
    """one(role, model) in a fresh process under `env`, in MB."""
    args = [sys.executable, __file__, "--one", role, model, *(x for o in overrides for x in ("--set", o))]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode:
        sys.exit(f"{model}, {role} failed:\n{proc.stderr[-3000:]}")
    return {k: v / 2**20 for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE", help="a run-config override for every model")
    p.add_argument("--one", nargs=2, metavar=("ROLE", "MODEL"), help=argparse.SUPPRESS)  # a child process's single measurement
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], {**MODELS, **LOADING}[a.one[1]] + a.overrides)))
        return 0
    print("| model | role | planned (MB) | allocated (MB) | resident (MB) | resident, mmap >= 128 KiB (MB) | planned / allocated | planned / resident, mmap >= 128 KiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, role in [*((m, r) for m in MODELS for r in ROLES), *((m, "trainer, loading") for m in LOADING)]:
        mb = in_child(role, model, a.overrides, {})
        mb["resident_mmap"] = in_child(role, model, a.overrides, FIXED_MMAP)["resident"]
        print(f"| {model} | {role} | {mb['planned']:.2f} | {mb['allocated']:.2f} | {mb['resident']:.2f} | {mb['resident_mmap']:.2f} "
              f"| {mb['planned'] / mb['allocated']:.2f}x | {mb['planned'] / mb['resident_mmap']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
