"""Train a one-step generator with Diff-Instruct*.

    python jobs/train.py [--config FILE] [--set a.b=VALUE ...] [--print-config] [--in-process]
    ray job submit --working-dir . -- python jobs/train.py [...]

Without --config, the embedded default run is used. The run goes on Ray: the cluster at
RAY_ADDRESS (set for you under `ray job submit`), else a local instance this job starts. It is
tracked as one MLflow run (tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db with
artifacts in ./mlartifacts); the finished generator is registered with alias `candidate`.
--in-process runs every role in this process instead (no Ray, no DeepSpeed): the single-process
baseline. Bad input exits with status 2 and one line, before any model loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar.cli import exit_status  # noqa: E402
from distar.config import load_config, to_yaml  # noqa: E402
from distar.errors import UserError  # noqa: E402
from distar.roles import from_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="run config YAML (see jobs/configs/); default: the embedded default run")
    p.add_argument("--set", metavar="PATH=VALUE", action="append", default=[], dest="overrides",
                   help="override one field, e.g. --set objective.alpha=0.5 (repeatable; VALUE is YAML)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--in-process", action="store_true", help="all roles in this process, without Ray: the single-process baseline")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from_config.check_inputs(cfg)  # an unreadable prompt source or model fails here, before anything starts
        if cfg.model.reference == "tiny-random":  # say so: these numbers mean nothing
            print("note: model.reference is `tiny-random`: untrained tiny models; "
                  "the numbers show the machinery works, not image quality.")
        if args.in_process:
            from distar.roles.in_process import train
        else:
            from distar.cluster.launch import train
        from distar.cluster.launch import job_id
        from distar.tracking.runs import TrainingRun

        with TrainingRun(cfg, job_id()) as tracked:  # a failure ends the MLflow run FAILED, registering nothing
            print(f"MLflow: {tracked.link()}", flush=True)
            version = tracked.register(train(cfg, tracked.target))
        print(f"registered {version.name} version {version.version} (alias candidate): models:/{version.name}@candidate")
    except (KeyboardInterrupt, UserError) as e:
        return exit_status(e, "pools shut down; the run resumes from its last checkpoint when started again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
