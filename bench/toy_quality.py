"""DI* against its teacher in the shapes world, measured side by side in one run.

    python bench/toy_quality.py [--score-run DIR] [--kl-run DIR] [--prompts N] [--cfg W]

Trains (unless the run folders already hold a generator) the embedded default run with the
score divergence and the same budget with KL (DI++), then samples 200 held-out prompts with
the reference (50 DDIM steps, CFG) and with each one-step generator, and prints the reader's
alignment accuracies and mean pref, seconds per image, and every ratio against the reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distar.config import load_config  # noqa: E402
from distar.roles.in_process import train  # noqa: E402
from distar.toy import assets, judge  # noqa: E402
from distar.toy.reader import Reader  # noqa: E402


def trained(folder: Path, divergence: str) -> Path:
    generator = folder / "generator"
    if not (generator / "model_index.json").is_file():
        cfg = load_config(None, [f"run.output_dir={folder}", f"objective.divergence={divergence}", f"run.name=bench-{divergence}"])
        train(cfg)
    return generator


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--score-run", type=Path, default=ROOT / "runs" / "bench-score")
    p.add_argument("--kl-run", type=Path, default=ROOT / "runs" / "bench-kl")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=None, help="reference guidance scale (default: the run config's)")
    args = p.parse_args()
    cfg_scale = args.cfg if args.cfg is not None else load_config().objective.cfg_scale

    folders = {"DI* (score)": trained(args.score_run, "score"), "DI++ (KL)": trained(args.kl_run, "kl")}
    reader, prompts = Reader.load(assets.path("reader")), judge.held_out_prompts(args.prompts)
    rows = {f"reference {args.steps} steps, cfg {cfg_scale}": judge.judge(assets.path("reference"), prompts, reader, args.steps, cfg_scale)[0].row()}
    rows.update({name: judge.judge(folder, prompts, reader)[0].row() for name, folder in folders.items()})
    print(judge.markdown(rows))
    base = next(iter(rows.values()))
    print("\nagainst the reference (same prompts, same noise seeds, timed in this process):")
    for name, row in list(rows.items())[1:]:
        gaps = ", ".join(f"{k} {100 * (row[k] - base[k]):+.1f} pts" for k in ("color", "shape", "position", "size"))
        print(f"- {name}: pref {row['pref'] - base['pref']:+.3f} ({row['pref'] / base['pref']:.3f}x); {gaps}; "
              f"time {row['s/image'] / base['s/image']:.4f}x; network calls {row['unet calls'] / base['unet calls']:.4f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
