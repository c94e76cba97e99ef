"""A trainer's memory, setting against setting, measured side by side in one invocation.

    python bench/memory.py [--resolution PX] [--batch B] [--dtype float32|bfloat16]

1. Gradient checkpointing on against off: one DI* step (fake-score update, generator update with
   the reward and reference backward passes) of the tiny SD1.5-structured models in one process,
   at a resolution where activations outweigh the tiny weights: the peak RSS rise during the step.
2. LoRA (model.lora, rank 8) against full fine-tuning, and 3. ZeRO-3 over 2 ranks against 1: the
   same run on a 69M-parameter UNet of SD1.5's structure (the tiny pipeline's other parts, 32 px),
   where weights, gradients and Adam states outweigh activations. Each process's peak RSS above
   its start, while it sets up (loads the reference, builds the networks and their optimisers) and
   while it takes two steps. ZeRO-3 runs the Ray runtime's DeepSpeed engines in processes of one
   gloo group (distar.cluster.local_engines), the global batch split over the ranks; its in-process
   pools put a reference UNet and the reward models in every rank, as in every setting here.

Each measurement runs in a fresh process (an allocator that kept an earlier run's memory would
flatter the next); RSS is sampled every 2 ms (distar.evaluation.measure.PeakMemory). Prints each
setting and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs/configs/smoke.yaml"
MID_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(256, 512), attention_head_dim=8,
                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32)  # the tiny text encoder's width
SETTINGS = {  # name: (overrides, trainer ranks)
    "full": ([], 1),
    "lora": (["model.lora={rank: 8}"], 1),
    "zero3 x1": (["cluster.zero_stage=3"], 1),
    "zero3 x2": (["cluster.zero_stage=3"], 2),
}


def checkpointing_step(resolution: int, batch: int, dtype: str, checkpointing: bool) -> dict:
    import torch

    from distar.config import load_config
    from distar.evaluation.measure import PeakMemory
    from distar.run.in_process import run_loop

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(SMOKE, [
            f"model.resolution={resolution}", f"data.batch_size={batch}", f"model.dtype={dtype}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}", f"run.output_dir={out}",
            f"cluster.reward_pool.max_batch_size={batch}", f"cluster.reference_pool.max_batch_size={batch}"])
        run = run_loop(cfg, log=lambda line: None)
        rng = torch.Generator().manual_seed(0)
        run.trainer.step(run.sampler.batch(0), rng)  # warm-up: lazily built state is not the step's
        with PeakMemory() as peak:
            values = run.trainer.step(run.sampler.batch(1), rng)
    return {"peak_mb": peak.mb, "loss": values["loss/generator"]}


def build_mid_pipeline(folder: Path) -> Path:
    """The tiny SD1.5-structured pipeline with a 69M-parameter UNet in place of its tiny one."""
    import torch
    from diffusers import UNet2DConditionModel

    from distar.models import tiny

    tiny.build_sd15_pipeline(folder)
    torch.manual_seed(0)
    UNet2DConditionModel(**MID_UNET).save_pretrained(folder / "unet")
    return folder


def setting_run(name: str, folder: str, batch: int) -> dict:
    """One rank's peak RSS above its start while it sets up and while it takes two steps."""
    import psutil
    import torch

    from distar.config import load_config
    from distar.evaluation.measure import PeakMemory
    from distar.run.in_process import InProcess
    from distar.run.loop import RunLoop

    overrides, world = SETTINGS[name]
    torch.set_num_threads(max(1, 2 // world))
    if name.startswith("zero3"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        from distar.cluster.local_engines import LocalEngines as Runtime
    else:
        Runtime = InProcess
    start = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(SMOKE, [f"model.reference={folder}", f"data.batch_size={batch // world}", "data.validation_size=0",
                                  f"run.output_dir={out}", *overrides])
        with PeakMemory() as setup:
            loop = RunLoop(cfg, Runtime(cfg), log=lambda line: None)
        held = (psutil.Process().memory_info().rss - start) / 2**20
        rng = torch.Generator().manual_seed(0)
        with PeakMemory() as steps:
            for step in range(2):  # the first builds the Adam states
                values = loop.trainer.step(loop.sampler.batch(step), rng)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for net in (loop.generator, loop.trainer.fake) for p in net.parameters() if p.requires_grad)  # ZeRO-3: whole sizes
    return {"setup_mb": setup.mb, "steps_mb": held + steps.mb, "trainable": trainable, "loss": values["loss/generator"]}


def child(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen, what: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"the {what} measurement failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_setting(name: str, folder: Path, batch: int) -> dict:
    """The setting's figures; over several ranks, the largest rank's."""
    from distar.cluster.session import free_port

    world = SETTINGS[name][1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world), "DS_ACCELERATOR": "cpu"}
    procs = [child(["--setting", name, "--folder", str(folder), "--batch", str(batch)], {**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    ranks = [result(p, name) for p in procs]
    return max(ranks, key=lambda r: r["steps_mb"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child's checkpointing measurement
    p.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # a child's (rank's) setting measurement
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(checkpointing_step(a.resolution, a.batch, a.dtype, a.one == "on")))
        return 0
    if a.setting:
        print(json.dumps(setting_run(a.setting, a.folder, a.batch)))
        return 0

    found = {s: result(child(["--one", s, "--resolution", str(a.resolution), "--batch", str(a.batch), "--dtype", a.dtype]), s) for s in ("off", "on")}
    print(f"1. one trainer step, tiny SD1.5-structured models, {a.resolution} px, batch {a.batch}, {a.dtype}, CPU")
    print("| gradient checkpointing | peak RSS rise (MB) | generator loss |\n| --- | --- | --- |")
    for s in ("off", "on"):
        print(f"| {s} | {found[s]['peak_mb']:.0f} | {found[s]['loss']:.4g} |")
    print(f"ratio on / off: {found['on']['peak_mb'] / found['off']['peak_mb']:.2f}x\n")

    with tempfile.TemporaryDirectory() as d:
        folder = build_mid_pipeline(Path(d) / "mid")
        runs = {name: measure_setting(name, folder, a.batch) for name in SETTINGS}
    print(f"2, 3. a trainer process, SD1.5-structured 69M-parameter UNet, 32 px, global batch {a.batch}, float32, CPU")
    print("| setting | trainable parameters (M) | peak RSS above start, setting up (MB) | peak RSS above start, two steps (MB) |\n| --- | --- | --- | --- |")
    for name, r in runs.items():
        print(f"| {name} | {r['trainable'] / 1e6:.1f} | {r['setup_mb']:.0f} | {r['steps_mb']:.0f} |")
    for what, key in (("setting up", "setup_mb"), ("two steps", "steps_mb")):
        print(f"{what}: lora / full {runs['lora'][key] / runs['full'][key]:.2f}x, zero3 x2 / x1 (a rank) {runs['zero3 x2'][key] / runs['zero3 x1'][key]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
