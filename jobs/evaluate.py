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

from distar.cli import Parser, exit_status  # noqa: E402
from distar.errors import UserError  # noqa: E402
from distar.toy.judge import HELD_OUT_SEED  # noqa: E402  evaluation noise never meets training's seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser("jobs/evaluate.py", __doc__)
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
    p.add_argument("--config", metavar="FILE", help="run config YAML: its rewards, tracking store and experiment (default: the embedded default run)")
    p.add_argument("--set", metavar="PATH=VALUE", action="append", default=[], dest="overrides", help="override one config field (repeatable)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
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
    try:
        from distar.config import load_config
        from distar.data import load_prompts, spread
        from distar.evaluation import evaluate, measure, runs, subjects
        from distar.models import sources
        from distar.storage import cache_dir
        from distar.tracking import store

        cfg = load_config(args.config, args.overrides)
        prompts = load_prompts(args.prompts, "--prompts")
        if args.limit is not None:
            if args.limit < 1:
                raise UserError(f"--limit: must be at least 1 (got {args.limit})")
            prompts = spread(prompts, args.limit)
        for i, r in enumerate(cfg.rewards):
            sources.resolve(r.source, r.name, cache_dir(), f"rewards.{i}.source", fetch=False)
        import torch

        quiet()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: torch sees no CUDA device on this machine")
        cfg_scale = args.cfg if args.cfg is not None else cfg.objective.cfg_scale
        uri = store.tracking_uri(args.tracking_uri or cfg.tracking.mlflow_uri)
        evaluation_id = runs.new_evaluation_id()
        k = min(args.diversity_prompts, len(prompts))
        params = {"prompts": store.redact(args.prompts), "prompt_count": str(len(prompts)), "seed": str(args.seed), "diversity_prompts": str(k),
                  "device": device, "memory_method": measure.memory_method(device),
                  **{f"reward.{r.name}": store.redact(r.source) for r in cfg.rewards}}
        tracked = runs.EvaluationRuns(uri, cfg.tracking.experiment, evaluation_id, params, prompts, args.prompts)  # connects: registry URIs resolve
        rows = [subjects.reference_subject(args.reference, cfg.model.family, args.steps, cfg_scale, device)] if args.reference else []
        rows += [subjects.model_subject(uri_, args.steps, cfg_scale) for uri_ in args.models]  # every URI checked before any model loads
        baseline = rows[0]
        if args.baseline:
            named = [s for s, given in zip(rows, (["reference"] if args.reference else []) + args.models) if given == args.baseline]
            if not named:
                raise UserError(f"--baseline: {args.baseline!r} is neither `reference` (with --reference) nor one of the --model arguments")
            baseline = named[0]
        if args.reference == "tiny-random" or any(r.source == "tiny-random" for r in cfg.rewards):
            print("note: tiny-random (untrained) models: the scores show the machinery works, not image quality.")
        judges = measure.load_judges(cfg, prompts, device)
        notes = [
            f"evaluation {evaluation_id}: {len(prompts)} prompts from `{store.redact(args.prompts)}`"
            + (f" (spread evenly over the source, --limit {args.limit})" if args.limit else "") + f", image i from noise seed {args.seed} + i",
            f"cells: value (ratio to the baseline row, {baseline.label}), all measured in this one invocation",
            f"rewards: {', '.join(f'{r.name} ({store.redact(r.source)})' for r in cfg.rewards) or 'none configured'}"
            + ("; pref and acc: the shapes-world reader" if judges.reader is not None else ""),
            f"diversity: mean RMS pixel distance (pixels in [0, 1]) between two images of the same prompt from two noise seeds, over the first {k} prompts",
            f"s/image: wall time to generate all {len(prompts)} images after a warm-up call, over {len(prompts)}, on {device}"
            + (f", torch threads: {torch.get_num_threads()}" if device == "cpu" else ""),
            f"peak MB: {measure.memory_method(device)}",
            "UNet calls: network evaluations per image (steps x 2 with classifier-free guidance)",
        ]
        with tracked:
            table = evaluate(rows, baseline, prompts, args.seed, judges, tracked, notes, k, device, log=lambda line: print(line, flush=True))
    except (KeyboardInterrupt, UserError) as e:
        return exit_status(e, "unfinished evaluation runs are marked KILLED", prefix="error:")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print()
    print(table)
    print(f"wrote {args.out}")
    for s in rows:
        print(f"MLflow: {s.label}: {tracked.link(s.run_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
