"""Every shipped preset runs as shipped, on Ray, two steps: its model sources swapped to tiny
random models, its resolution lowered and its cluster shaped for this machine, every other field
(family, t*, dtype, checkpointing, guidance, weights, batch) as the file has it."""

import json
from pathlib import Path

import pytest
import yaml

from distar.config import load_config

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
# smoke.yaml is left out here: it runs as shipped (tiny models already) on the same cluster in
# tests/test_cluster.py's submitted run, which checks what this test checks and more.
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.endswith("_sweep.yaml") and p.name != "smoke.yaml")
MACHINE = ["cluster.trainer_workers=1", "cluster.trainer_gpus=0", "cluster.trainer_cpus=1",
           *[f"cluster.{pool}.{k}={v}" for pool in ("reward_pool", "reference_pool") for k, v in (("replicas", 1), ("num_gpus", 0), ("num_cpus", 0.5))]]


def swapped(preset: str, out: Path) -> list[str]:
    """--set overrides that keep everything of the preset but its sources, size and cluster."""
    shipped = yaml.safe_load((CONFIGS / preset).read_text())
    sets = ["model.reference=tiny-random", "data.prompts=tiny-random", "model.resolution=32", "run.steps=2", f"run.output_dir={out}", *MACHINE]
    if shipped.get("model", {}).get("generator_init"):
        sets.append("model.generator_init=tiny-random")
    for i, reward in enumerate(shipped.get("rewards", [])):
        sets.append(f"rewards.{i}.source=tiny-random")
        if reward.get("processor"):
            sets.append(f"rewards.{i}.processor=tiny-random")
    return sets


@pytest.mark.parametrize("preset", PRESETS)
def test_the_preset_runs_two_steps_on_ray(jobs, ray_cluster, tmp_path, preset):
    out = tmp_path / "run"
    sets = swapped(preset, out)
    cfg, shipped = load_config(CONFIGS / preset, sets), load_config(CONFIGS / preset)
    assert (cfg.objective, cfg.optim, cfg.data.batch_size) == (shipped.objective, shipped.optim, shipped.data.batch_size)
    assert cfg.model.model_dump(exclude={"reference", "generator_init", "resolution"}) == \
        shipped.model.model_dump(exclude={"reference", "generator_init", "resolution"})
    proc = jobs.run("train.py", "--config", str(CONFIGS / preset), *[a for s in sets for a in ("--set", s)], env=ray_cluster.run_env, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2] and all(m["skipped"] == 0 for m in history)
    assert all(v == v and abs(v) != float("inf") for m in history for v in m.values())
    assert (out / "generator" / "model_index.json").is_file()
