"""DI* against its teacher in the shapes world, measured side by side in one run.

    python bench/toy_quality.py [--score-run DIR] [--kl-run DIR] [--prompts N] [--steps N] [--cfg W]

Trains (unless the run folders already hold a generator) the embedded default run with the
score divergence and the same budget with KL (DI++), then samples N held-out prompts (200) with
the reference (50 DDIM steps, CFG) and with each one-step generator, and measures them the way
jobs/evaluate.py does: the reader's alignment accuracies and mean pref, the rewards, diversity,
seconds per image and network calls, each with its ratio to the reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distar.config import load_config  # noqa: E402
from distar.data import HELD_OUT_SEED  # noqa: E402
from distar.evaluation.judges import load_judges  # noqa: E402
from distar.evaluation.measure import measure_all  # noqa: E402
from distar.evaluation.subjects import Subject  # noqa: E402
from distar.models.sampling import Sampler  # noqa: E402
from distar.run.in_process import train  # noqa: E402
from distar.toy import assets, world  # noqa: E402


def trained(folder: Path, divergence: str) -> Path:
    generator = folder / "generator"
    if not (generator / "model_index.json").is_file():
        cfg = load_config(None, [f"run.output_dir={folder}", f"objective.divergence={divergence}", f"run.name=bench-{divergence}"])
        train(cfg).exported()
    return generator


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--score-run", type=Path, default=ROOT / "runs" / "bench-score")
    p.add_argument("--kl-run", type=Path, default=ROOT / "runs" / "bench-kl")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=None, help="reference guidance scale (default: the run config's)")
    args = p.parse_args()
    cfg = load_config()
    cfg_scale = args.cfg if args.cfg is not None else cfg.objective.cfg_scale

    folders = {"DI* (score divergence), 1000 steps": trained(args.score_run, "score"), "DI++ (KL), 1000 steps": trained(args.kl_run, "kl")}
    reference = Subject("reference", f"reference, {args.steps} DDIM steps, CFG {cfg_scale:g}",
                        lambda: Sampler(assets.path("reference"), args.steps, cfg_scale, world.SIZE))
    rows = [reference] + [Subject(str(f), name, lambda f=f: Sampler(f, resolution=world.SIZE)) for name, f in folders.items()]
    prompts = world.held_out_prompts(args.prompts, HELD_OUT_SEED)
    notes = [f"{args.prompts} held-out prompts of the shapes world, image i from noise seed {HELD_OUT_SEED} + i, all measured in this one run"]
    print(measure_all(rows, reference, prompts, HELD_OUT_SEED, load_judges(cfg, prompts), None, notes, log=lambda line: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
