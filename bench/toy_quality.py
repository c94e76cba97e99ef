"""DI* against its teacher and against KL in the shapes world, at equal budget, over seeds.

    python bench/toy_quality.py [--seeds 0 1 2] [--set PATH=VALUE ...] [--runs DIR] [--prompts N] [--steps N] [--cfg W] [--guard FILE]
                                [--divergences score kl]

Trains (unless a run folder already holds a generator) the embedded default run with the score
divergence and the same budget with KL (DI++) for each seed (run.seed: initial noise, batches,
timesteps), both with the --set overrides (another setting: give it its own --runs folder), then samples N held-out prompts (200) with the reference (50 DDIM steps, CFG) and with
each one-step generator, and measures them the way jobs/evaluate.py does: the rewards, the reader's
pref and accuracies, the faithfulness check, the distribution metrics against world renders and
against the reference's samples, diversity and cost, each with its ratio to the reference. Then
one line per metric: each divergence's mean and sample standard deviation over the seeds.

With --guard (a YAML mapping of judges to margins, as run.guard.judges), each training's
validations (kept in its folder's validations.jsonl) are replayed through the guard: where it would
have tripped and which step it would have kept, with that step's validation beside the last one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distar import safe_yaml  # noqa: E402
from distar.config import GuardSection, load_config  # noqa: E402
from distar.data import HELD_OUT_SEED  # noqa: E402
from distar.evaluation.judges import load_judges  # noqa: E402
from distar.evaluation.measure import AgainstReference, measure_all  # noqa: E402
from distar.evaluation.subjects import Subject  # noqa: E402
from distar.models.sampling import Sampler  # noqa: E402
from distar.run.guard import Guard  # noqa: E402
from distar.run.in_process import train  # noqa: E402
from distar.toy import assets, world  # noqa: E402

DIVERGENCES = {"score": "DI* (score)", "kl": "DI++ (KL)"}
SUMMARY = ("reward/pickscore", "pref", "acc/shape", "acc/all", "world/misplaced", "world/fid", "world/precision", "world/recall",
           "world/coverage", "ref/fid", "ref/precision", "ref/recall", "diversity")


def trained(folder: Path, divergence: str, seed: int, overrides: list[str]) -> Path:
    """The default run's generator with this divergence and seed (an interrupted training resumes);
    its validations are appended to validations.jsonl as they come, each step once."""
    generator = folder / "generator"
    if not (generator / "model_index.json").is_file():
        cfg = load_config(None, [*overrides, f"run.output_dir={folder}", f"objective.divergence={divergence}", f"run.seed={seed}", f"run.name=bench-{divergence}-{seed}"])
        train(cfg, log=lambda line: _kept(folder / "validations.jsonl", line)).exported()
    return generator


def _kept(path: Path, line: str) -> None:
    print(line, flush=True)
    if line.startswith("validation at step "):
        values = _parsed(line)
        seen = {json.loads(kept)["step"] for kept in path.read_text().splitlines()} if path.is_file() else set()
        if values["step"] not in seen:  # a resumed training validates its replayed steps again
            with path.open("a") as f:
                f.write(json.dumps(values) + "\n")


def _parsed(line: str) -> dict:
    """A validation line back into {step, val/*} (values printed to 4 significant digits)."""
    head, _, values = line.partition(" | ")
    return {"step": int(head.rsplit(" ", 1)[1]), **{f"val/{k}": float(v) for k, v in (kv.split("=") for kv in values.split())}}


def replay(folder: Path, judges: dict[str, float]) -> str:
    """What the guard would have done on this run's validations (from step 1 on: the start is not printed)."""
    cfg = load_config()
    guard = Guard(GuardSection(enabled=True, judges=judges), cfg.rewards)
    history = [json.loads(line) for line in (folder / "validations.jsonl").read_text().splitlines()]
    for v in history:
        verdict = guard.observe(v["step"], v)
        if verdict.action:
            break
    kept = next(v for v in history if v["step"] == guard.state.kept_step)
    shown = [k for k in ("val/pref", "val/acc/shape", "val/acc/all", "val/world/misplaced", "val/world/precision", "val/world/coverage") if k in kept]
    cells = ", ".join(f"{k.removeprefix('val/')} {kept[k]:.3g} vs {history[-1][k]:.3g}" for k in shown)
    tripped = f"tripped at step {verdict.reason.split()[2]}" if verdict.action else "never tripped"
    return f"{folder.name}: {tripped}, kept step {guard.state.kept_step} of {history[-1]['step']} (kept vs last: {cells})"


def summary(rows: list[Subject], seeds: list[int], divergences: list[str]) -> str:
    """Mean +- sample standard deviation over the seeds of each divergence's rows, a line per metric."""
    names = [DIVERGENCES[d] for d in divergences]
    lines = [f"| metric | reference | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for k in SUMMARY:
        if k not in rows[-1].metrics:
            continue
        cells = [f"{rows[0].metrics[k]:.4g}" if k in rows[0].metrics else "-"]
        for name in names:
            values = [s.metrics[k] for s in rows if s.label.startswith(name)]
            spread = f" +- {statistics.stdev(values):.2g}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.4g}{spread}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nmean +- sample standard deviation over seeds {', '.join(map(str, seeds))}\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE", help="a run-config override for every training, e.g. objective.alpha=4")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder of the trainings: bench-<divergence>[-seed<S>]")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=None, help="reference guidance scale (default: the run config's)")
    p.add_argument("--guard", type=Path, default=None, help="YAML file: judges to margins, replayed on each training's validations")
    p.add_argument("--divergences", nargs="+", choices=list(DIVERGENCES), default=list(DIVERGENCES), help="which to train and judge (default: both)")
    args = p.parse_args()
    cfg = load_config(None, args.overrides)
    cfg_scale = args.cfg if args.cfg is not None else cfg.objective.cfg_scale

    runs = {(d, s): args.runs / (f"bench-{d}" + (f"-seed{s}" if s else "")) for s in args.seeds for d in args.divergences}
    folders = {(d, s): trained(folder, d, s, args.overrides) for (d, s), folder in runs.items()}
    reference = Subject("reference", f"reference, {args.steps} DDIM steps, CFG {cfg_scale:g}",
                        lambda: Sampler(assets.path("reference"), args.steps, cfg_scale, world.SIZE))
    rows = [reference] + [Subject(str(f), f"{DIVERGENCES[d]}, seed {s}, {cfg.run.steps} steps", lambda f=f: Sampler(f, resolution=world.SIZE))
                          for (d, s), f in folders.items()]
    prompts = world.held_out_prompts(args.prompts, HELD_OUT_SEED)
    judges = load_judges(cfg, prompts)
    notes = [f"{args.prompts} held-out prompts of the shapes world, image i from noise seed {HELD_OUT_SEED} + i, all measured in this one run",
             f"the default run{' with ' + ', '.join(args.overrides) if args.overrides else ''}"]
    print(measure_all(rows, reference, prompts, HELD_OUT_SEED, judges, None, notes, log=lambda line: None, versus=AgainstReference(judges.reader.features, reference)))
    print(summary(rows, args.seeds, args.divergences))
    if args.guard is not None:
        judges_margins = safe_yaml.load(args.guard.read_text())
        print("\n".join(replay(folder, judges_margins) for folder in runs.values() if (folder / "validations.jsonl").is_file()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
