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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("jobs/promote.py", __doc__)
    p.add_argument("name", help="registered model name, e.g. distar-generator")
    p.add_argument("version", help="the version to promote, e.g. 3")
    p.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    p.add_argument("--force", action="store_true", help="promote even without an evaluation run of VERSION")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default: tracking.mlflow_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_config("run config YAML, for its tracking section")
    args = p.parse_args(argv)
    return cli.run(lambda: promote(args))


def promote(args) -> None:
    from distar.config import load_config
    from distar.evaluation.promotion import promote
    from distar.tracking import store

    cfg = load_config(args.config, args.overrides)
    promote(store.resolve(args.tracking_uri or cfg.tracking.mlflow_uri), args.name, args.version, args.alias, args.force)


if __name__ == "__main__":
    sys.exit(main())
