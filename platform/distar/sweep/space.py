"""A sweep's space file: which run-config fields vary and how, the search algorithm, the
early-stopping scheduler and the rule that picks the best trial.

    search:     {algorithm: random | grid | optuna, num_samples: 4, max_concurrent: null, seed: 0}
    scheduler:  {kind: asha | fifo, metric: val/pref, mode: max, grace_period: 1, reduction_factor: 2}
    select:     {metric: val/pref, mode: max,          # default: the scheduler's metric and mode
                 require: {val/acc/all: reference, val/acc/shape: {reference: 0.03}, val/world/misplaced: 0.15}}  # (sweep/selection.py)
    parameters:
      objective.alpha:  {loguniform: [0.1, 10]}
      rewards.0.weight: {uniform: [0.5, 2.0]}
      objective.cfg_scale: {choice: [3.0, 4.5, 6.0]}
      objective.cfg_placement: {grid: [inside, outside]}

Every parameter path must name a field of the base run config (list items included, e.g.
`rewards.1.weight` where the base config has two rewards), and every value a distribution can
take there must pass the config's own validation: the grid and choice values, and both ends of
a range. Anything else is refused before a trial starts, with the entry named.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distar import safe_yaml
from distar.config import ConfigError, RunConfig, load_config, set_path
from distar.errors import UserError

KINDS = ("grid", "choice", "uniform", "loguniform")
ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")
METRIC_PREFIX = "val/"  # what the trainer reports on the validation prompts
# Fields every trial shares: the pools' models (one set of pools serves all trials), the
# cluster, the tracking target and the names the sweep gives each trial.
SHARED = re.compile(r"^(model\.(family|reference|num_train_timesteps|resolution|dtype)|rewards\.\d+\.(name|source)|cluster\.|tracking\.|run\.(name|output_dir|storage_path)$)")


class SpaceError(UserError):
    """A bad space file; the message names the entry."""

    kind = "space error"


@dataclass(frozen=True)
class Distribution:
    kind: str  # one of KINDS
    values: tuple  # grid/choice: the values; uniform/loguniform: (low, high)

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return (tune.uniform if self.kind == "uniform" else tune.loguniform)(*self.values)


@dataclass(frozen=True)
class Space:
    parameters: dict[str, Distribution]
    algorithm: str
    num_samples: int
    max_concurrent: int | None
    seed: int
    scheduler: str
    metric: str
    mode: str
    grace_period: int
    reduction_factor: int
    select_metric: str
    select_mode: str
    require: dict  # select.require: val/* metric -> a number, `reference` or {reference: margin}

    @property
    def trials(self) -> int:
        """Trials the sweep runs: every grid combination, num_samples times."""
        grids = [len(d.values) for d in self.parameters.values() if d.kind == "grid"]
        return self.num_samples * math.prod(grids)

    def param_space(self) -> dict:
        """Tune's param_space: run-config paths to Tune distributions."""
        return {path: d.to_tune() for path, d in self.parameters.items()}


def _fail(entry: str, message: str) -> SpaceError:
    return SpaceError(f"{entry}: {message}")


def _section(tree: dict, name: str, allowed: set[str]) -> dict:
    section = tree.get(name) or {}
    if not isinstance(section, dict):
        raise _fail(name, f"expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise _fail(f"{name}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(allowed))})")
    return section


def _int(section: dict, name: str, key: str, default: int | None, low: int) -> int | None:
    value = section.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(f"{name}.{key}", f"expected an integer >= {low}, got {value!r}")
    return value


def _choice(section: dict, name: str, key: str, default: str | None, options: tuple[str, ...]) -> str:
    value = section.get(key, default)
    if value not in options:
        raise _fail(f"{name}.{key}", f"expected one of {', '.join(options)}, got {value!r}")
    return value


def _metric(section: dict, name: str, default: str | None) -> str:
    value = section.get("metric", default)
    if not isinstance(value, str) or not value.startswith(METRIC_PREFIX) or value == METRIC_PREFIX:
        raise _fail(f"{name}.metric", f"expected a validation metric `{METRIC_PREFIX}<name>` (e.g. val/pref, val/reward/pickscore), got {value!r}")
    return value


def _require(section: Any) -> dict:
    """select.require: each val/* metric bounded by a finite number, `reference` or `{reference: margin}`."""
    from distar.sweep.selection import REFERENCE

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(section, dict):
        raise _fail("select.require", f"expected a mapping of val/* metrics to bounds, got {type(section).__name__}")
    for name, bound in section.items():
        within = isinstance(bound, dict) and list(bound) == [REFERENCE] and finite(bound[REFERENCE]) and bound[REFERENCE] >= 0
        if not (finite(bound) or bound == REFERENCE or within):
            raise _fail(f"select.require.{name}", f"expected a finite number, `{REFERENCE}` (the reference model's own value) "
                        f"or {{{REFERENCE}: m}} (that value worse by at most m >= 0), got {bound!r}")
        if name.startswith(f"{METRIC_PREFIX}ref/") and not finite(bound):
            raise _fail(f"select.require.{name}", "this metric already compares with the reference's samples; bound it by a number")
    return dict(section)


def _distribution(path: str, spec: Any) -> Distribution:
    entry = f"parameters.{path}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(entry, f"expected one distribution, e.g. {{uniform: [0.5, 2.0]}}; one of {', '.join(KINDS)}")
    kind, args = next(iter(spec.items()))
    if kind not in KINDS:
        raise _fail(entry, f"unknown distribution {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(args, list) or not args:
        raise _fail(f"{entry}.{kind}", f"expected a non-empty list, got {args!r}")
    if kind in ("grid", "choice"):
        return Distribution(kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise _fail(f"{entry}.{kind}", f"expected [low, high] numbers, got {args!r}")
    low, high = float(args[0]), float(args[1])
    if not low < high:
        raise _fail(f"{entry}.{kind}", f"low ({low:g}) must be below high ({high:g})")
    if kind == "loguniform" and low <= 0:
        raise _fail(f"{entry}.{kind}", f"a log-uniform range must be positive, got low {low:g}")
    return Distribution(kind, (low, high))


def _check_against_config(path: str, dist: Distribution, base: str | Path | None, overrides: list[str], leaves: set[str]) -> None:
    """The path names a field of the base config, and every value it can take validates there."""
    if path not in leaves:
        raise _fail(f"parameters.{path}", "no such field in the run config" + _near(path, leaves))
    ranged = dist.kind in ("uniform", "loguniform")
    # A range samples between its ends too: a value with a fraction shows a field that takes only integers.
    inside = (dist.values[0] + 0.37 * (dist.values[1] - dist.values[0]),) if ranged else ()
    for value in (*dist.values, *inside):
        try:
            load_config(base, [*overrides, f"{path}={json.dumps(value)}"])
        except ConfigError as e:
            reason = e.message.splitlines()[0]
            if value in inside:
                raise _fail(f"parameters.{path}.{dist.kind}", f"samples values such as {value:g}, which this field refuses ({reason}); "
                            "use choice or grid for a field that takes integers") from None
            raise _fail(f"parameters.{path}.{dist.kind}", f"{value!r} is not a valid value ({reason})") from None


def _check_reported(metric: str, entry: str, cfg: RunConfig) -> None:
    from distar.run.validation import unreported

    reason = unreported(cfg, metric)
    if reason:
        raise _fail(entry, reason)


def _near(path: str, leaves: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(path, sorted(leaves), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _leaves(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, dict) and tree:
        return {leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}{k}.")}
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):  # lists of sections (rewards): items by index
        return {leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{prefix}{i}.")}
    return {prefix.rstrip(".")}


def load_space(path: str | Path, base: str | Path | None = None, overrides: list[str] = ()) -> Space:
    """Parse and check a space file against the base run config (a YAML path, or the default, with `overrides`)."""
    p = Path(path)
    if not p.is_file():
        raise _fail("--space", f"{p}: no such file")
    try:
        tree = safe_yaml.load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _fail("--space", f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise _fail("--space", f"{p}: top level must be a mapping (search, scheduler, select, parameters)")
    unknown = sorted(set(tree) - {"search", "scheduler", "select", "parameters"})
    if unknown:
        raise _fail(unknown[0], "unknown section (known: search, scheduler, select, parameters)")

    search = _section(tree, "search", {"algorithm", "num_samples", "max_concurrent", "seed"})
    algorithm = _choice(search, "search", "algorithm", "random", ALGORITHMS)
    scheduler = _section(tree, "scheduler", {"kind", "metric", "mode", "grace_period", "reduction_factor"})
    metric, mode = _metric(scheduler, "scheduler", None), _choice(scheduler, "scheduler", "mode", "max", ("max", "min"))
    select = _section(tree, "select", {"metric", "mode", "require"})
    select_metric, select_mode = _metric(select, "select", metric), _choice(select, "select", "mode", mode, ("max", "min"))
    require = _require(select.get("require") or {})

    raw = tree.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise _fail("parameters", "expected a mapping of run-config paths to distributions, with at least one entry")
    parameters = {str(k): _distribution(str(k), v) for k, v in raw.items()}
    base_cfg = load_config(base, overrides)  # a bad base config fails as a config error, before the space
    leaves = _leaves(base_cfg.model_dump(mode="json"))
    for path, dist in parameters.items():
        if SHARED.match(path):
            raise _fail(f"parameters.{path}", "every trial shares this field (the pools' models, the cluster, tracking, the trial names): set it in the run config")
        _check_against_config(path, dist, base, overrides, leaves)
    _check_reported(metric, "scheduler.metric", base_cfg)
    _check_reported(select_metric, "select.metric", base_cfg)
    for name in require:
        _check_reported(name, f"select.require.{name}", base_cfg)

    kinds = {d.kind for d in parameters.values()}
    if algorithm == "grid" and kinds != {"grid"}:
        odd = next(p for p, d in parameters.items() if d.kind != "grid")
        raise _fail(f"parameters.{odd}", "search.algorithm grid takes only grid parameters; use random or optuna to sample ranges")
    if algorithm == "optuna":
        if "grid" in kinds:
            odd = next(p for p, d in parameters.items() if d.kind == "grid")
            raise _fail(f"parameters.{odd}", "Optuna samples; it cannot take a grid (use choice)")
        if importlib.util.find_spec("optuna") is None:
            raise _fail("search.algorithm", "optuna needs the optuna package (pip install optuna)")
    return Space(
        parameters=parameters, algorithm=algorithm,
        num_samples=_int(search, "search", "num_samples", 1, 1), max_concurrent=_int(search, "search", "max_concurrent", None, 1),
        seed=_int(search, "search", "seed", 0, 0),
        scheduler=_choice(scheduler, "scheduler", "kind", "asha", SCHEDULERS), metric=metric, mode=mode,
        grace_period=_int(scheduler, "scheduler", "grace_period", 1, 1), reduction_factor=_int(scheduler, "scheduler", "reduction_factor", 2, 2),
        select_metric=select_metric, select_mode=select_mode, require=require,
    )


def apply(cfg: RunConfig, sampled: dict[str, Any]) -> RunConfig:
    """A trial's config: the base config with the sampled values set at their paths."""
    tree = cfg.model_dump(mode="json")
    for path, value in sampled.items():
        set_path(tree, path, value)
    return RunConfig.model_validate(tree)
