"""Generate one image per prompt with a pipeline folder, so anyone can look at and judge the outputs.

    python jobs/generate.py --model PATH|toy --prompts FILE --out DIR [--steps N] [--cfg W] [--seed S]

Writes DIR/00000.png, DIR/00001.png, ... in prompt order. `toy` names the shipped miniature
Stable Diffusion, sampled with N DDIM steps at guidance scale W; a one-step generator folder
(written by jobs/train.py) is sampled in one step at its t*, ignoring --steps and --cfg.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar import cli  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser("jobs/generate.py", __doc__)
    p.add_argument("--model", required=True, help="pipeline folder, hub id, or `toy`")
    p.add_argument("--prompts", required=True, help="prompt source: .txt (one a line), .csv/.json with a `prompt` column, or `toy`")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of a diffusion model (default 50)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale of a diffusion model (default 3.0)")
    p.add_argument("--seed", type=int, default=0, help="image i uses noise seed + i (default 0)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's native size)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.cfg < 0 or args.seed < 0 or (args.resolution is not None and args.resolution < 8):
        p.error("--steps must be >= 1, --cfg >= 0, --seed >= 0 and --resolution >= 8")
    return args


def generate(args: argparse.Namespace) -> None:
    from distar.data import load_prompts
    from distar.errors import UserError
    from distar.images import save_png, to_uint8
    from distar.models import sources
    from distar.models.sampling import Sampler
    from distar.storage import cache_dir

    prompts = load_prompts(args.prompts, field="--prompts")
    folder = sources.resolve(args.model, "toy" if args.model == "toy" else "sd15", cache_dir(), "--model")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--model: {folder} is not a diffusers pipeline folder (no model_index.json)")
    images = Sampler(folder, args.steps, args.cfg, args.resolution).generate(prompts, range(args.seed, args.seed + len(prompts)))
    args.out.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(to_uint8(images)):
        save_png(pixels, args.out / f"{i:05d}.png")
    print(f"wrote {len(images)} images to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
