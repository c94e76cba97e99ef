"""Evaluate generators side by side: rewards, the toy reader, diversity, time and memory, with ratios.

    python jobs/evaluate.py --model URI [--model URI ...] --prompts SOURCE [--reference SOURCE --steps N --cfg W]
                            [--limit N] [--seed S] [--baseline URI|reference] [--config FILE] [--set a.b=VALUE ...] [--out FILE]

--model takes a registry URI (models:/NAME@ALIAS, models:/NAME/VERSION), a run's model
(runs:/RUN_ID/generator), an MLflow model folder or a diffusers pipeline folder. --reference adds
the reference diffusion model (`toy`, a folder or a hub id), sampled with N DDIM steps at guidance
W, as the baseline row. --prompts is a .txt file (one prompt a line), a .csv/.json with a `prompt`
column, `toy` (the shapes world), or hf://ORG/NAME[:SPLIT] where the machine reaches the Hugging
Face hub. Every model samples the same prompts with the same noise seeds in this one process.

The reward models are the run config's (`rewards`; default: the toy world's PickScore and CLIP
score). One MLflow run per model goes to the config's tracking store and experiment (--tracking-uri,
else tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db), all sharing one
distar.evaluation_id; a registry model's metrics are tied to its version. The table is printed,
written to --out and logged with every run. Bad input exits with status 2 and one line, before
any model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar import cli  # noqa: E402
from distar.data import HELD_OUT_SEED  # noqa: E402  evaluation noise never meets training's seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.Parser("jobs/evaluate.py", __doc__)
    p.add_argument("--model", metavar="URI", action="append", default=[], dest="models",
                   help="a generator to evaluate: models:/NAME@ALIAS, models:/NAME/N, runs:/ID/generator or a folder (repeatable)")
    p.add_argument("--prompts", required=True, metavar="SOURCE", help="prompt source: .txt, .csv/.json with a prompt column, `toy`, hf://ORG/NAME[:SPLIT]")
    p.add_argument("--reference", metavar="SOURCE", help="add the reference diffusion model (`toy`, a folder or hub id) as the baseline row")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of diffusion models (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale of diffusion models (default: the config's objective.cfg_scale)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate N prompts spread evenly over the source (default: all)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help=f"image i uses noise seed S + i (default {HELD_OUT_SEED}, away from training's)")
    p.add_argument("--diversity-prompts", type=int, default=16, metavar="K", help="prompts sampled with a second seed for the diversity measure (default 16)")
    p.add_argument("--baseline", metavar="URI|reference", help="the row ratios are taken against (default: the reference, else the first --model)")
    p.add_config("run config YAML: its rewards, tracking store and experiment (default: the embedded default run)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--features", metavar="SOURCE", help="a DINOv2 or CLIP model (folder or hub id) whose features compare each model's images "
                   "with the reference's: ref/fid, precision, recall, density, coverage (needs --reference and 64 prompts or more)")
    p.add_argument("--out", type=Path, default=Path("evaluation.md"), help="markdown table (default evaluation.md)")
    args = p.parse_args(argv)
    if not args.models and not args.reference:
        p.error("nothing to evaluate: give --model URI (repeatable) and/or --reference SOURCE")
    if args.steps < 1 or (args.cfg is not None and args.cfg < 0) or args.seed < 0 or args.diversity_prompts < 0:
        p.error("--steps must be >= 1, --cfg >= 0, --seed >= 0 and --diversity-prompts >= 0")
    return args


def quiet() -> None:
    """No per-component progress bars or per-call scheduler warnings: the job prints its own lines."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: evaluate(args), interrupted="unfinished evaluation runs are marked KILLED")


def evaluate(args: argparse.Namespace) -> None:
    from distar import evaluation

    quiet()
    fields = {k: v for k, v in vars(args).items() if k != "out"}
    report = evaluation.run(evaluation.Request(**fields), log=lambda line: print(line, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.table)
    print(f"\n{report.table}")
    print(f"wrote {args.out}")
    for s in report.subjects:
        print(f"MLflow: {s.label}: {report.runs.link(s.run_id)}")


if __name__ == "__main__":
    sys.exit(main())
