"""Where a training step's time and CPU go, in one process and on Ray, measured side by side.

    python bench/step_profile.py [--steps N] [--workers W] [--set key=value ...]

Runs the default run for N steps in-process and then on a local Ray instance the job starts
(W trainer workers, each with 1/W of the same global batch), as `jobs/train.py` runs them. While each runs, it samples the CPU time of
every process of the job (the driver, Ray's daemons, the trainer workers, the pool replicas)
and prints, per step over the steady steps (the first fifth of the steps and the last are left
out: warm-up and export), the wall and CPU seconds of each process role, and inside the trainer
the seconds of each part of its step, from the run's metrics file (distar.run.timing): its
forwards, its updates, waiting on each pool, sending to them, and DeepSpeed ZeRO-3's gathers;
then each job's whole wall time, start-up and export included, and the ratios Ray / in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distar.cluster.pools import ACTOR_CLASSES  # noqa: E402
from distar.config import RunConfig  # noqa: E402
from distar.run.timing import STEP_PARTS  # noqa: E402


def role_of(proc: psutil.Process, driver: int) -> str:
    """The process's role; Ray's own processes by name (its actors' titles are `ray::<class>...`)."""
    if proc.pid == driver:
        return "job (driver)"
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "ray: (gone)"
    title = " ".join(cmdline)
    role = next((role for role, actor in ACTOR_CLASSES.items() if actor in title), None)
    if role is not None:
        return role
    if title.startswith("ray::"):
        return "ray: " + title.removeprefix("ray::").split(".")[0].split()[0].split(":")[0]
    script = next((Path(a).name for a in cmdline[1:] if a.endswith(".py")), None)  # python daemons: dashboard.py, agent.py, ...
    return "ray: " + (script or (Path(cmdline[0]).name if cmdline else proc.name()))


def cpu_by_process(driver: psutil.Process) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of the driver and every process under it."""
    found = {}
    for proc in [driver, *driver.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            found[proc.pid] = (role_of(proc, driver.pid), times.user + times.system)
        except psutil.Error:
            continue
    return found


def steps_done(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def profile(args: list[str], out: Path, first: int, last: int) -> dict:
    """Run jobs/train.py; CPU of each role and wall time between the steady window's first and last step."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (out.parent / f"{out.name}.log").open("w+")
    job = subprocess.Popen([sys.executable, "jobs/train.py", *args, "--set", f"run.output_dir={out}"], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    driver, marks, started = psutil.Process(job.pid), {}, time.perf_counter()
    while job.poll() is None:
        done = steps_done(out / "metrics.jsonl")
        for step in (first, last):
            if step not in marks and done >= step:
                marks[step] = (time.perf_counter(), done, cpu_by_process(driver))
        time.sleep(0.05)
    if job.returncode or len(marks) < 2:
        log.seek(0)
        sys.exit(f"jobs/train.py {' '.join(args)} failed (exit {job.returncode}):\n{log.read()[-3000:]}")
    (t0, s0, cpu0), (t1, s1, cpu1) = marks[first], marks[last]
    steps = s1 - s0
    cpu = defaultdict(float)
    for pid, (role, seconds) in cpu1.items():
        cpu[role] += (seconds - cpu0.get(pid, (role, 0.0))[1]) / steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    window = [r for r in rows if s0 < r["step"] <= s1]
    parts = {f"{kind}/{p}": sum(r.get(f"{kind}/{p}", 0.0) for r in window) / len(window) for kind in ("time", "cpu") for p in STEP_PARTS}
    return {"wall": (t1 - t0) / steps, "cpu": dict(cpu), "parts": parts, "steps": (s0, s1), "job": time.perf_counter() - started}


def table(results: dict[str, dict]) -> None:
    names = list(results)
    print(f"{'seconds per step':<30}" + "".join(f"{n:>24}" for n in names))
    print(f"{'':<30}" + "".join(f"{'wall':>12}{'CPU':>12}" for _ in names))
    print(f"{'whole step':<30}" + "".join(f"{r['wall']:>12.3f}{sum(r['cpu'].values()):>12.3f}" for r in results.values()))
    print("CPU by process role (Ray's own processes under 0.01 s a step together)")
    for r in results.values():
        small = [role for role, s in r["cpu"].items() if role.startswith("ray: ") and s < 0.01]
        if small:
            r["cpu"][f"ray: {len(small)} other processes"] = sum(r["cpu"].pop(role) for role in small)
    roles = sorted({role for r in results.values() for role in r["cpu"]})
    for role in roles:
        print(f"  {role:<28}" + "".join(f"{'':>12}{r['cpu'].get(role, 0.0):>12.3f}" for r in results.values()))
    print("the trainer's step, by part (its process: wall and CPU seconds)")
    for p in STEP_PARTS:
        print(f"  {p:<28}" + "".join(f"{r['parts'][f'time/{p}']:>12.3f}{r['parts'][f'cpu/{p}']:>12.3f}" for r in results.values()))
    print(f"  {'(sum of parts)':<28}" + "".join(f"{sum(r['parts'][f'time/{p}'] for p in STEP_PARTS):>12.3f}"
                                              f"{sum(r['parts'][f'cpu/{p}'] for p in STEP_PARTS):>12.3f}" for r in results.values()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for both runs")
    a = p.parse_args()
    first, last = max(1, a.steps // 5), a.steps - 1
    sets = [f"run.steps={a.steps}", f"run.log_every={a.steps}", *a.set]
    common = [x for s in sets for x in ("--set", s)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        common += ["--set", f"tracking.mlflow_uri=sqlite:///{tmp}/mlflow.db"]
        results["in-process"] = profile([*common, "--in-process"], Path(tmp, "in_process"), first, last)
        # The same global batch on W workers (each trains on its rows); a --set of data.batch_size overrides it.
        split = ["--set", f"cluster.trainer_workers={a.workers}", "--set", f"data.batch_size={RunConfig().data.batch_size // a.workers}"]
        results[f"Ray, {a.workers} worker(s)"] = profile([*split, *common], Path(tmp, "ray"), first, last)
    base, ray = results.values()
    print(f"default run{' with ' + ' '.join(a.set) if a.set else ''}: steps {base['steps'][0] + 1}-{base['steps'][1]} of {a.steps}, "
          f"{os.cpu_count()} CPUs")
    table(results)
    print(f"whole job, start-up and export included: {base['job']:.1f} s in-process, {ray['job']:.1f} s on Ray")
    print(f"ratio Ray / in-process: training rate {base['wall'] / ray['wall']:.2f}x, whole job {ray['job'] / base['job']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
