"""Which trial a sweep registers: the best final selection metric among completed trials that
meet the space's held-out constraints (`select.require`).

A constraint bounds a val/* metric: a number, or `reference`, the reference diffusion model's own
value on the validation prompts (subjects.REFERENCE_STEPS DDIM steps at the base config's guidance, noise
from the held-out seed, scored by the judges validation uses), or `{reference: m}`, that value
worse by at most m (within a few points of the reference). "No worse than the bound" follows
the metric's direction (distar.evaluation.judges.lower_is_better): at least the bound where
higher is better, at most where lower is. A reward that wins by leaving the data's distribution
loses here, whatever its selection metric.
"""

from __future__ import annotations

import math

from distar.config import RunConfig
from distar.evaluation.judges import lower_is_better
from distar.evaluation.subjects import REFERENCE_STEPS
from distar.sweep.results import COMPLETED, Outcome

REFERENCE = "reference"  # a bound taken from the reference's own value


def reference_values(cfg: RunConfig) -> dict[str, float]:
    """The reference diffusion model's val/* values on the run's validation prompts (its ref/*, against itself, are left out)."""
    from distar.data import validation_prompts
    from distar.evaluation.judges import load_judges
    from distar.evaluation.subjects import reference_samples

    prompts = validation_prompts(cfg.data.prompts, cfg.data.validation_prompts, cfg.data.validation_size)
    return {f"val/{k}": v for k, v in load_judges(cfg, prompts).score(reference_samples(cfg, prompts), prompts).items()}


def margin(bound: float | str | dict) -> float | None:
    """How much worse than the reference a bound allows; None for a plain number."""
    if bound == REFERENCE:
        return 0.0
    return float(bound[REFERENCE]) if isinstance(bound, dict) else None


def needs_reference(require: dict) -> bool:
    return any(margin(bound) is not None for bound in require.values())


def bounds(require: dict[str, float | str | dict], reference: dict[str, float]) -> dict[str, float]:
    """Each constraint's bound as a number: the reference's value moved by its margin in the worse direction."""
    out = {}
    for metric, bound in require.items():
        allowed = margin(bound)
        if allowed is None:
            out[metric] = float(bound)
        else:
            out[metric] = reference[metric] + (allowed if lower_is_better(metric) else -allowed)
    return out


def unmet(metrics: dict[str, float], limits: dict[str, float]) -> list[str]:
    """The constraints `metrics` fails, each as `metric value op bound` (a missing or non-finite value fails)."""
    out = []
    for metric, bound in limits.items():
        value, lower = metrics.get(metric, math.nan), lower_is_better(metric)
        if not (math.isfinite(value) and (value <= bound if lower else value >= bound)):
            out.append(f"{metric} {value:.4g} {'>' if lower else '<'} {bound:.4g}")
    return out


def select(outcomes: list[Outcome], metric: str, mode: str, limits: dict[str, float]) -> Outcome | None:
    """The completed trial meeting every constraint with the best final `metric` (trials stopped
    early or failed never win); None when no trial qualifies."""
    scored = [o for o in outcomes if o.status == COMPLETED and math.isfinite(o.metrics.get(metric, math.nan)) and not unmet(o.metrics, limits)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda o: o.metrics[metric])


def describe(metric: str, mode: str, require: dict[str, float | str | dict], limits: dict[str, float]) -> str:
    """The rule in words, with each constraint's bound."""
    rule = f"best final {metric} ({mode}) among completed trials"
    if not require:
        return rule
    parts = [f"{m} {'<=' if lower_is_better(m) else '>='} {limits[m]:.4g}" + _origin(b) for m, b in require.items()]
    return f"{rule} with {', '.join(parts)}"


def _origin(bound: float | str | dict) -> str:
    allowed = margin(bound)
    if allowed is None:
        return ""
    return f" (the reference's, {REFERENCE_STEPS} steps" + (f", worse by at most {allowed:g})" if allowed else ")")
