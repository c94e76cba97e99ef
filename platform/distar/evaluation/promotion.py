"""Moving a registered generator's alias (`champion`), after showing what changes.

The version's latest evaluation run (jobs/evaluate.py) is set beside that of the version now
holding the alias, preferring two runs of the same evaluation (same prompts, seeds and machine,
so their timings compare). A version no evaluation has seen is refused unless forced.
"""

from __future__ import annotations

from collections.abc import Callable

from distar.errors import UserError
from distar.evaluation import runs, table
from distar.tracking import store


def promote(where: store.Store, name: str, version: str, alias: str = "champion", force: bool = False, log: Callable[[str], None] = print) -> None:
    """Log the comparison, then point `alias` of registered model `name` at `version`."""
    from mlflow.exceptions import MlflowException

    store.connect(where)
    client, shown = where.client(), store.redact(where.uri)
    if not version.isdigit():
        raise UserError(f"VERSION: expected a version number, got {version!r}")
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise UserError(f"{name}: no registered model of that name in {shown}") from None
    try:
        client.get_model_version(name, version)
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise UserError(f"{name} has no version {version} in {shown} (versions: {', '.join(map(str, known)) or 'none'})") from None
    try:
        current = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        current = None
    if current == version:
        log(f"{name} v{version} already holds {alias}; nothing to move")
        return
    new_runs = runs.evaluation_runs(client, name, version)
    if not new_runs and not force:
        raise UserError(f"{name} v{version} has no evaluation run in {shown}; evaluate it first "
                        f"(python jobs/evaluate.py --model models:/{name}/{version} --prompts SOURCE) or pass --force")
    log(f"{alias} of {name}: " + (f"v{current}" if current else "held by no version yet") + f" -> v{version}\n")
    log(comparison(client, name, version, current, alias, new_runs))
    client.set_registered_model_alias(name, alias, version)
    log(f"moved {alias} {f'from v{current} ' if current else ''}to {name} v{version}: models:/{name}@{alias}")


def comparison(client, name: str, version: str, current: str | None, alias: str, new_runs: list) -> str:
    """The two versions' latest evaluations side by side, and where the numbers come from."""
    old_runs = runs.evaluation_runs(client, name, current) if current else []
    new_run, old_run = runs.latest_pair(new_runs, old_runs)
    if new_run is None:
        return f"v{version} has no evaluation run (--force): no metrics to compare\n"
    old = (f"v{current} ({alias})", runs.raw_metrics(old_run)) if old_run is not None else None
    ids = [r.data.tags.get(runs.TAG_ID) for r in (old_run, new_run) if r is not None]
    if current and old_run is None:
        source = f"v{current} has no evaluation run: only v{version}'s metrics are shown"
    elif len(ids) == 2 and ids[0] != ids[1]:
        source = f"from two evaluations ({ids[0]}, {ids[1]}): prompts, seeds or machine may differ, compare timings with care"
    else:
        source = f"from evaluation {ids[-1]} (runs: " + ", ".join(r.info.run_id for r in (old_run, new_run) if r is not None) + ")"
    return f"{table.side_by_side(old, (f'v{version}', runs.raw_metrics(new_run)))}\n\n{source}"
