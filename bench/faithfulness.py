"""How well the world-faithfulness check (distar.toy.faithfulness) tells the world's images from
the ones it never draws, measured in one run.

    python bench/faithfulness.py [--renders N] [--distorted N] [--prompts N] [--generator NAME=DIR ...]

Scores N world renders (how many it flags wrongly: its false-off-world rate), N images of each
deliberate distortion at three strengths (pinched squares, lumpy circles, blur beyond the world's
range: how many it flags), and the reference's samples on held-out prompts at 50 DDIM steps and
the run config's CFG, with any one-step generators given (their images from the same noise).
Each row: the median share of the shape's area misplaced, its 90th percentile, the share of
images over the tolerance, and next to them the reader's shape accuracy where there is a prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distar.config import load_config  # noqa: E402
from distar.data import HELD_OUT_SEED  # noqa: E402
from distar.evaluation.judges import load_reader  # noqa: E402
from distar.models.sampling import Sampler  # noqa: E402
from distar.toy import assets, distortions, faithfulness, world  # noqa: E402
from distar.toy.reader import to_tensor  # noqa: E402

STRENGTHS = {"pinched": (0.1, 0.2, 0.35), "wobbly": (0.05, 0.1, 0.2), "blurred": (0.25, 0.5, 1.0)}
WHAT = {"pinched": "square, sides bowed in by {s:g} x half the side", "wobbly": "circle, radius swinging {s:g} x itself 5 times round",
        "blurred": "any shape, blur {sigma:.2f} px (the world's most: 1.2)"}


def row(name: str, images, prompts: list[str] | None = None, reader=None) -> str:
    share = faithfulness.check(images).misplaced.numpy()
    shape = f"{reader.read(images).accuracy(prompts)['shape']:.2f}" if reader is not None else ""
    return f"| {name} | {len(share)} | {np.median(share):.3f} | {np.quantile(share, 0.9):.3f} | {(share > faithfulness.TOLERANCE).mean():.2f} | {shape} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--renders", type=int, default=500)
    p.add_argument("--distorted", type=int, default=100)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--generator", action="append", default=[], metavar="NAME=DIR", help="a one-step generator folder to score too")
    args = p.parse_args()
    generators = dict(g.split("=", 1) for g in args.generator)

    lines = [f"tolerance: {faithfulness.TOLERANCE} of the shape's area misplaced", "",
             "| images | n | median misplaced | 90th percentile | share off-world | reader's shape accuracy |", "|---|---|---|---|---|---|"]
    images, _ = world.sample(args.renders, seed=HELD_OUT_SEED + 1)
    lines.append(row("world renders", to_tensor(images)))
    for kind, strengths in STRENGTHS.items():
        for s in strengths:
            rng = np.random.default_rng(HELD_OUT_SEED + 2)  # the same attributes and noise at every strength
            images = np.stack([distortions.distorted(kind, s, rng)[0] for _ in range(args.distorted)])
            lines.append(row(f"{kind}: " + WHAT[kind].format(s=s, sigma=world.BLUR[1] * (1 + s)), to_tensor(images)))

    cfg = load_config()
    prompts = world.held_out_prompts(args.prompts, HELD_OUT_SEED)
    seeds = [HELD_OUT_SEED + i for i in range(len(prompts))]
    reader = load_reader(prompts)
    samplers = {f"reference, 50 DDIM steps, CFG {cfg.objective.cfg_scale:g}": Sampler(assets.path("reference"), 50, cfg.objective.cfg_scale, world.SIZE),
                **{name: Sampler(folder, resolution=world.SIZE) for name, folder in generators.items()}}
    for name, sampler in samplers.items():
        lines.append(row(name, sampler.generate(prompts, seeds).float().cpu(), prompts, reader))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
