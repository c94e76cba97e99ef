"""Which trial a sweep registers: the best final selection metric among completed trials that
meet the space's held-out constraints (`select.require`).

A constraint bounds a val/* metric: a number, or `reference`, the reference diffusion model's own
value on the validation prompts (REFERENCE_STEPS DDIM steps at the base config's guidance, noise
from the held-out seed, scored by the judges validation uses). "No worse than the bound" follows
the metric's direction (distar.evaluation.judges.lower_is_better): at least the bound where
higher is better, at most where lower is. A reward that wins by leaving the data's distribution
loses here, whatever its selection metric.
"""

from __future__ import annotations

import math

from distar.config import RunConfig
from distar.evaluation.judges import lower_is_better
from distar.sweep.results import COMPLETED, Outcome

REFERENCE = "reference"  # a bound taken from the reference's own value
REFERENCE_STEPS = 50


def reference_values(cfg: RunConfig) -> dict[str, float]:
    """The reference diffusion model's val/* values on the run's validation prompts."""
    from distar.data import HELD_OUT_SEED, validation_prompts
    from distar.evaluation.judges import load_judges
    from distar.evaluation.subjects import reference_subject

    prompts = validation_prompts(cfg.data.prompts, cfg.data.validation_prompts, cfg.data.validation_size)
    model = reference_subject(cfg.model.reference, cfg.model.family, REFERENCE_STEPS, cfg.objective.cfg_scale).open()
    images = model.generate(prompts, list(range(HELD_OUT_SEED, HELD_OUT_SEED + len(prompts))))
    return {f"val/{k}": v for k, v in load_judges(cfg, prompts).score(images, prompts).items()}


def bounds(require: dict[str, float | str], reference: dict[str, float]) -> dict[str, float]:
    """Each constraint's bound as a number (`reference` replaced by the reference's value)."""
    return {metric: reference[metric] if bound == REFERENCE else float(bound) for metric, bound in require.items()}


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


def describe(metric: str, mode: str, require: dict[str, float | str], limits: dict[str, float]) -> str:
    """The rule in words, with each constraint's bound."""
    rule = f"best final {metric} ({mode}) among completed trials"
    if not require:
        return rule
    parts = [f"{m} {'<=' if lower_is_better(m) else '>='} {limits[m]:.4g}" + (f" (the reference's, {REFERENCE_STEPS} steps)" if b == REFERENCE else "")
             for m, b in require.items()]
    return f"{rule} with {', '.join(parts)}"
