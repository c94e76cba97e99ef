"""Train a one-step generator with Diff-Instruct*.

    python jobs/train.py [--config FILE] [--set a.b=VALUE ...] [--print-config] [--in-process]
                         [--gpu-memory GIB | --skip-memory-check]
    ray job submit --working-dir . -- python jobs/train.py [...]

Without --config, the embedded default run is used. The run goes on Ray: the cluster at
RAY_ADDRESS (set for you under `ray job submit`), else a local instance this job starts. It is
tracked as one MLflow run (tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db with
artifacts in ./mlartifacts); the finished generator is registered with alias `candidate`.
--in-process runs every role in this process instead (no Ray, no DeepSpeed): the single-process
baseline. Starting the same run again resumes it from its last checkpoint; a run that trains
differently is refused (another run.output_dir, or --restart to start over), and so is a second run
on a folder in use. Bad input exits with status 2 and one line, before any model loads; so does
a run that asks for GPUs its roles cannot fit (jobs/plan.py's check, against this machine's GPU or
--gpu-memory GiB; --skip-memory-check skips it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("jobs/train.py", __doc__)
    p.add_config()
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--in-process", action="store_true", help="all roles in this process, without Ray: the single-process baseline")
    p.add_argument("--restart", action="store_true", help="delete the output folder's checkpoints and metrics and start over")
    memory = p.add_mutually_exclusive_group()
    memory.add_argument("--gpu-memory", type=float, metavar="GIB", help="check the memory plan against GPUs of this many GiB (default: this machine's)")
    memory.add_argument("--skip-memory-check", action="store_true", help="start a run that asks for GPUs without checking that its roles fit them")
    args = p.parse_args(argv)
    return cli.run(lambda: train(args), interrupted="pools shut down; the run resumes from its last checkpoint when started again")


def train(args) -> None:
    from distar.config import absolute_paths, load_config, to_yaml
    from distar.run.build import check_inputs

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    cfg = absolute_paths(cfg)  # as every process of the run and its checkpoints name them
    check_inputs(cfg)  # an unreadable prompt source or model fails here, before anything starts
    if cfg.model.reference == "tiny-random":  # say so: these numbers mean nothing
        print("note: model.reference is `tiny-random`: untrained tiny models; the numbers show the machinery works, not image quality.")
    if args.in_process:  # every role on this CPU
        from distar.run.in_process import train
    else:
        from distar.cluster.launch import train
        from distar.plan.fit import check_run

        checked = None if args.skip_memory_check else check_run(cfg, args.gpu_memory)
        if checked:
            print(checked, flush=True)
    from distar.cluster.session import job_id
    from distar.run.resume import claimed
    from distar.tracking.runs import TrainingRun

    # The folder is this run's alone, and resumes only a run that trains the same; a failure ends
    # the MLflow run FAILED, registering nothing.
    with claimed(cfg, restart=args.restart), TrainingRun(cfg, job_id()) as tracked:
        print(f"MLflow: {tracked.link()}", flush=True)
        outcome = train(cfg, tracked.target)
        if outcome.guard:  # the guard chose which generator to export
            print(f"guard: {outcome.guard}")
        version = tracked.register(outcome.exported())
    print(f"registered {version.name} version {version.version} (alias candidate): models:/{version.name}@candidate")


if __name__ == "__main__":
    sys.exit(main())
