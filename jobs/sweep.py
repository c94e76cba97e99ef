"""Sweep a run's reward weights, divergence coefficient, CFG scale (any run-config field) with Ray Tune.

    python jobs/sweep.py --config RUN.yaml --space SPACE.yaml [--set a.b=VALUE ...]
    ray job submit --working-dir . -- python jobs/sweep.py --config RUN.yaml --space SPACE.yaml

Each trial is a full training run on Ray Train (the base config with the trial's values), tracked
as a child of the sweep's MLflow run; one set of reward and reference pools serves every trial.
The space file (see jobs/configs/toy_sweep.yaml) chooses the distributions, the search
algorithm, the early-stopping scheduler on a validation metric and the selection rule. The
sweep writes results.md, results.csv and pareto.png into run.output_dir and to MLflow, and
registers the selected trial's generator with alias `candidate`. The same command on the same
run.output_dir resumes an interrupted sweep. Bad input exits with status 2 and one line, before
anything starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("jobs/sweep.py", __doc__)
    p.add_config("the base run config YAML; default: the embedded default run")
    p.add_argument("--space", metavar="FILE", required=True, help="the sweep's space file (e.g. jobs/configs/toy_sweep.yaml)")
    p.add_argument("--pools-per-trial", action="store_true", help="every trial starts its own pools instead of sharing one set (the baseline of bench/sweep_sharing.py)")
    args = p.parse_args(argv)
    return cli.run(lambda: sweep(args), interrupted="pools shut down; the same command resumes the sweep")


def sweep(args) -> None:
    from distar.config import load_config
    from distar.run.build import check_inputs
    from distar.sweep.space import load_space

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space, args.config, args.overrides)
    check_inputs(cfg)
    from distar.sweep.runner import sweep

    result = sweep(cfg, space, Path(args.space).read_text(), shared_pools=not args.pools_per_trial)
    v = result.version
    print(f"selected trial {result.chosen.trial_id}; registered {v.name} version {v.version} (alias candidate): models:/{v.name}@candidate")
    print(f"results: {result.table}, {result.plot}")


if __name__ == "__main__":
    sys.exit(main())
