"""A prepared check for a GPU machine: NCCL and the skip vote, then one real-size DI* run on Ray.

    python bench/gpu_check.py [--cpu-twin]

1. The skip vote (distar.cluster.engines.all_ranks_agree) on spawned NCCL ranks, one per GPU (at
   most 2): every rank True gives True, one rank False gives False, on every rank.
2. A DI* run of 3 steps on Ray, started as jobs/train.py starts one, from SD1.5's published
   architecture with random weights (distar.models.published) at 512 px in bf16 with gradient
   checkpointing, trainer and pools on fractions of one GPU: each role's peak memory, the step
   time (from the MLflow run's samples_per_s) and every step's losses.

Ray: a local instance it starts, or RAY_ADDRESS. Disk: about 30 GB of temporary files on a GPU
(model, checkpoint with Adam states, export). --cpu-twin runs the same code on CPU: gloo on 2
ranks, tiny models at 32 px, no GPU for any role. Exits 1 if a check fails or a number is not finite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))  # runnable from a bare checkout (and in the spawned ranks)

STEPS = 3


@dataclass(frozen=True)
class Mode:
    """What differs between the GPU check and its CPU twin; everything else is the same code."""

    gpu: bool
    backend: str  # of the vote's process group
    world: int  # vote processes
    resolution: int
    gpus: tuple[float, float, float] = (0.0, 0.0, 0.0)  # trainer worker, reward replica, reference replica


def mode_of(cpu_twin: bool) -> Mode:
    import torch

    if cpu_twin:
        return Mode(gpu=False, backend="gloo", world=2, resolution=32)
    if not torch.cuda.is_available():
        sys.exit("no GPU visible to torch: run with --cpu-twin on a machine without one")
    return Mode(gpu=True, backend="nccl", world=max(1, min(2, torch.cuda.device_count())), resolution=512, gpus=(0.5, 0.25, 0.25))


def _vote_rank(rank: int, mode: Mode, port: int, results) -> None:
    """One rank: join the process group, vote twice (the last rank votes False the second time)."""
    import torch
    import torch.distributed as dist

    from distar.cluster.engines import all_ranks_agree

    if mode.gpu:
        torch.cuda.set_device(rank)  # NCCL reduces on the rank's own GPU: all_ranks_agree puts its flag there
    dist.init_process_group(mode.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=mode.world,
                            timeout=timedelta(seconds=120))
    results.put((rank, all_ranks_agree(True), all_ranks_agree(rank != mode.world - 1)))
    dist.barrier()  # no rank tears its connections down while another still uses them (gloo aborts then)
    dist.destroy_process_group()


def check_vote(mode: Mode) -> bool:
    """The skip vote on `mode.world` spawned ranks; prints one line per check."""
    import torch.multiprocessing as mp

    from distar.cluster.session import free_port

    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_vote_rank, args=(mode, free_port(), results), nprocs=mode.world, join=True)
    except Exception as e:  # a rank that raised: its traceback is in the exception
        print(f"vote: process group {mode.backend} with {mode.world} rank(s) FAILED: {e}")
        return False
    votes, ok = sorted(results.get() for _ in range(mode.world)), True
    print(f"vote: process group {mode.backend} initialised on {mode.world} rank(s) ok")
    for label, column, expected in (("every rank votes True", 1, True), ("the last rank votes False", 2, False)):
        got = [v[column] for v in votes]
        ok &= (passed := all(g is expected for g in got))
        print(f"vote: {label}: ranks agree on {got}, expected {expected}: {'ok' if passed else 'FAILED'}")
    return ok


def gpu_memory() -> tuple[dict[int, float], float]:
    """Used GPU memory (MiB) per process, as nvidia-smi sees it, and on all GPUs together."""
    def query(what: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        return [[f.strip() for f in line.split(",")] for line in out.stdout.splitlines() if line.strip()]

    per_pid: dict[int, float] = {}
    for pid, used in query("compute-apps=pid,used_memory"):
        if used.replace(".", "").isdigit():  # "[N/A]" where the driver does not account per process
            per_pid[int(pid)] = per_pid.get(int(pid), 0.0) + float(used)
    return per_pid, sum(float(row[0]) for row in query("gpu=memory.used"))


class PeakMemory:
    """`with PeakMemory(gpu) as m:` m.peak[measure][pid] is the peak MiB of each role's process
    (m.role[pid]), sampled every 0.5 s from outside: no code of the check runs inside a role."""

    RSS, GPU = "RSS (psutil)", "GPU used (nvidia-smi)"

    def __init__(self, gpu: bool, every: float = 0.5):
        self.gpu, self.every, self.role, self.peak = gpu, every, {}, {self.GPU: {}, self.RSS: {}}
        self.device_mb, self.samples, self.errors = 0.0, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _find(self) -> None:
        import ray
        from ray.util.state import list_actors

        from distar.cluster.pools import ACTOR_CLASSES

        if not ray.is_initialized():  # before that, the state API could read another cluster's address file
            return
        context = ray.get_runtime_context()
        for actor in list_actors(address=context.gcs_address, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
            role = next((r for r, name in ACTOR_CLASSES.items() if name in (actor.class_name or "")), None)
            if role and actor.pid and actor.node_id == context.get_node_id():  # a pid means something on its own node only
                self.role[actor.pid] = role

    def _poll(self) -> None:
        import psutil

        now = {}
        for pid in list(self.role):
            with contextlib.suppress(psutil.Error):  # ended, or on another node
                now[self.RSS, pid] = psutil.Process(pid).memory_info().rss / 2**20
        if self.gpu:
            per_pid, total = gpu_memory()
            self.device_mb = max(self.device_mb, total)
            now.update({(self.GPU, pid): mb for pid, mb in per_pid.items() if pid in self.role})
        for (measure, pid), mb in now.items():
            self.peak[measure][pid] = max(self.peak[measure].get(pid, 0.0), mb)
        self.samples += 1

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self.every):
            try:
                if tick % 4 == 0:  # roles start while the run goes on; listing actors costs more than a poll
                    self._find()
                self._poll()
            except Exception as e:  # keep sampling; reported under the table
                self.errors.append(f"{type(e).__name__}: {e}")
            tick += 1


def run_config(mode: Mode, tmp: Path, reference: str):
    from distar.config import load_config

    trainer, reward, reference_pool = mode.gpus
    return load_config(None, [
        "run.name=gpu-check", f"run.output_dir={tmp / 'run'}", f"run.steps={STEPS}", "run.log_every=1", "model.family=sd15",
        f"model.reference={reference}", f"model.resolution={mode.resolution}", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
        "rewards=[{name: pickscore, source: tiny-random, weight: 1.0}]", "data.prompts=tiny-random", "data.batch_size=1",
        "data.validation_size=0", "cluster.trainer_workers=1", f"cluster.trainer_gpus={trainer}",
        f"cluster.reward_pool={{replicas: 1, num_gpus: {reward}}}", f"cluster.reference_pool={{replicas: 1, num_gpus: {reference_pool}}}",
        f"tracking.mlflow_uri=sqlite:///{tmp}/mlflow.db", f"tracking.grid_every={10**6}",  # grids only before and after
    ])


def train(cfg, mode: Mode):
    """The run as jobs/train.py starts it, without registering the generator; memory sampled throughout."""
    import ray

    from distar.cluster import launch
    from distar.tracking.runs import TrainingRun

    with TrainingRun(cfg) as tracked, PeakMemory(mode.gpu) as memory:
        print(f"MLflow: {tracked.link()}", flush=True)
        outcome = launch.train(cfg, tracked.target)
        tracked.finish()
    ray.shutdown()  # also from a cluster at RAY_ADDRESS: no Ray log line interleaves with the report below
    return outcome, memory, tracked


def memory_table(memory: PeakMemory) -> bool:
    """Prints role | processes | peak MiB | measure; True if every role has a figure > 0."""
    from distar.cluster.pools import ACTOR_CLASSES

    print(f"{'role':<10} {'processes':>9} {'peak MiB':>10}  measure ({memory.samples} samples every {memory.every} s)")
    ok = True
    for measure in [memory.GPU] * memory.gpu + [memory.RSS]:
        peaks = memory.peak[measure]
        if measure == memory.GPU and not peaks:  # inside a container nvidia-smi may list the host's pids
            print("note: nvidia-smi listed none of the roles' pids (another PID namespace?): no per-role GPU figures")
            continue
        for role in ACTOR_CLASSES:
            pids = [pid for pid in peaks if memory.role[pid] == role]
            mb = max((peaks[pid] for pid in pids), default=0.0)
            ok &= mb > 0
            print(f"{role:<10} {len(pids):>9} {mb:>10.1f}  {measure}")
    if memory.gpu:
        print(f"{'all GPUs':<10} {'':>9} {memory.device_mb:>10.1f}  GPU used on the device (nvidia-smi)")
    for error in sorted(set(memory.errors))[:5]:
        print(f"sampler error: {error}")
    return ok


def step_figures(cfg, tracked) -> bool:
    """The losses of every step (finite, none skipped) and the time of steps 2..N from samples_per_s."""
    lines = (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]  # rank 0's values as the run wrote them, non-finite ones included
    ok = len(steps) == STEPS
    for v in steps:
        ok &= (finite := all(math.isfinite(v.get(k, math.nan)) for k in ("loss/generator", "loss/fake_score")) and v.get("skipped") == 0)
        print(f"step {v['step']}: loss/generator={v.get('loss/generator')} loss/fake_score={v.get('loss/fake_score')} "
              f"skipped={v.get('skipped')}: {'finite' if finite else 'FAILED'}")
    rates = {m.step: m.value for m in tracked.client.get_metric_history(tracked.run_id, "samples_per_s")}
    samples = cfg.data.batch_size * cfg.cluster.trainer_workers
    later = [samples / rates[s] for s in range(2, STEPS + 1) if rates.get(s, 0) > 0]  # step 1 also pays for warm-up
    seconds = sum(later) / len(later) if len(later) == STEPS - 1 else math.nan
    ok &= math.isfinite(seconds)
    print(f"step time: {seconds:.3f} s/step (steps 2-{STEPS}, {samples} sample(s) a step, from samples_per_s)")
    return ok


def check_run(mode: Mode, tmp: Path) -> bool:
    """Build the reference, run it, print what it measured."""
    reference = "tiny-random"  # the twin's: tiny, with SD1.5's structure
    if mode.gpu:
        from distar.models.published import build_sd15_random

        reference = str(build_sd15_random(tmp / "sd15"))
        print(f"built SD1.5's published architecture with random weights in {reference}", flush=True)
    cfg = run_config(mode, tmp, reference)
    try:
        outcome, memory, tracked = train(cfg, mode)
    except Exception:  # the traceback says where; the table would have nothing to show
        traceback.print_exc()
        print("run: FAILED")
        return False
    ok = outcome.stopped is None
    print(f"run: {outcome.step} steps on Ray, {'finished' if ok else 'stopped: ' + str(outcome.stopped)}")
    ok &= memory_table(memory)
    return step_figures(cfg, tracked) and ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-twin", action="store_true", help="the same checks on CPU: gloo, tiny models at 32 px, no GPUs")
    args = p.parse_args()
    mode = mode_of(args.cpu_twin)
    # Before deepspeed is imported anywhere: here, in the spawned ranks (they inherit it), in Ray's processes.
    os.environ["DS_ACCELERATOR"] = "cuda" if mode.gpu else "cpu"
    ok = check_vote(mode)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ok = check_run(mode, Path(tmp)) and ok
    print("gpu check: all ok" if ok else "gpu check: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
