"""Move a registered generator's `champion` alias, after showing what changes.

    python jobs/promote.py NAME VERSION [--alias champion] [--force] [--tracking-uri URI] [--config FILE] [--set a.b=VALUE ...]

Finds the latest evaluation run (jobs/evaluate.py) of VERSION and of the version now holding the
alias, preferring two runs of the same evaluation (same prompts, seeds and machine), prints their
metrics side by side with the difference, then points the alias at VERSION. A version without an
evaluation run is refused unless --force. The store is --tracking-uri, else the config's
tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db. Bad input exits with status 2
and one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar.cli import Parser, exit_status  # noqa: E402
from distar.errors import UserError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser("jobs/promote.py", __doc__)
    p.add_argument("name", help="registered model name, e.g. distar-generator")
    p.add_argument("version", help="the version to promote, e.g. 3")
    p.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    p.add_argument("--force", action="store_true", help="promote even without an evaluation run of VERSION")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--config", metavar="FILE", help="run config YAML, for its tracking section")
    p.add_argument("--set", metavar="PATH=VALUE", action="append", default=[], dest="overrides", help="override one config field (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import mlflow
        from mlflow.exceptions import MlflowException

        from distar.config import load_config
        from distar.evaluation import runs, table
        from distar.tracking import store

        cfg = load_config(args.config, args.overrides)
        uri = store.tracking_uri(args.tracking_uri or cfg.tracking.mlflow_uri)
        store.connect(uri, cfg.tracking.experiment)
        client = mlflow.MlflowClient(uri)
        where = store.redact(uri)
        name, version = args.name, args.version
        if not version.isdigit():
            raise UserError(f"VERSION: expected a version number, got {version!r}")
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise UserError(f"{name}: no registered model of that name in {where}") from None
        try:
            client.get_model_version(name, version)
        except MlflowException:
            known = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
            raise UserError(f"{name} has no version {version} in {where} (versions: {', '.join(map(str, known)) or 'none'})") from None
        try:
            current = str(client.get_model_version_by_alias(name, args.alias).version)
        except MlflowException:
            current = None
        if current == version:
            print(f"{name} v{version} already holds {args.alias}; nothing to move")
            return 0

        new_runs = runs.evaluation_runs(client, name, version)
        if not new_runs and not args.force:
            raise UserError(f"{name} v{version} has no evaluation run in {where}; evaluate it first "
                            f"(python jobs/evaluate.py --model models:/{name}/{version} --prompts SOURCE) or pass --force")
        old_runs = runs.evaluation_runs(client, name, current) if current else []
        new_run, old_run = runs.latest_pair(new_runs, old_runs)

        print(f"{args.alias} of {name}: " + (f"v{current}" if current else "held by no version yet") + f" -> v{version}\n")
        if new_run is None:
            print(f"v{version} has no evaluation run (--force): no metrics to compare\n")
        else:
            old = (f"v{current} ({args.alias})", runs.raw_metrics(old_run)) if old_run is not None else None
            print(table.side_by_side(old, (f"v{version}", runs.raw_metrics(new_run))))
            ids = [r.data.tags.get(runs.TAG_ID) for r in (old_run, new_run) if r is not None]
            print()
            if current and old_run is None:
                print(f"v{current} has no evaluation run: only v{version}'s metrics are shown")
            elif len(ids) == 2 and ids[0] != ids[1]:
                print(f"from two evaluations ({ids[0]}, {ids[1]}): prompts, seeds or machine may differ, compare timings with care")
            else:
                print(f"from evaluation {ids[-1]} (runs: " + ", ".join(r.info.run_id for r in (old_run, new_run) if r is not None) + ")")
        client.set_registered_model_alias(name, args.alias, version)
        moved = f"from v{current} " if current else ""
        print(f"moved {args.alias} {moved}to {name} v{version}: models:/{name}@{args.alias}")
    except UserError as e:
        return exit_status(e, "", prefix="error:")
    return 0


if __name__ == "__main__":
    sys.exit(main())
