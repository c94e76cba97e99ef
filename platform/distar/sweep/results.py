"""What a sweep leaves a person to read and act on: one row per trial (its values, its status,
its last validation), the best completed trial by the space's selection rule, and a Pareto plot
of reward against alignment and against divergence with every trial marked.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

COMPLETED, STOPPED, FAILED, INTERRUPTED = "completed", "stopped early", "failed", "interrupted"


@dataclass
class Outcome:
    trial_id: str
    status: str  # one of COMPLETED, STOPPED, FAILED, INTERRUPTED
    params: dict[str, object]  # the sampled values, by run-config path
    metrics: dict[str, float] = field(default_factory=dict)  # the last report: step values and the latest val/*
    run_id: str | None = None  # its child MLflow run
    error: str | None = None


def status_of(tune_status: str, last: dict, steps: int, error: bool) -> str:
    """A trial's status from Tune's: TERMINATED before the last step means the scheduler stopped it."""
    if error or tune_status == "ERROR":
        return FAILED
    if tune_status != "TERMINATED":
        return INTERRUPTED
    return COMPLETED if last.get("step", 0) >= steps else STOPPED


def best(outcomes: list[Outcome], metric: str, mode: str) -> Outcome | None:
    """The completed trial with the best final `metric` (trials stopped early or failed never win)."""
    scored = [o for o in outcomes if o.status == COMPLETED and math.isfinite(o.metrics.get(metric, math.nan))]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda o: o.metrics[metric])


def pareto_front(points: list[tuple[float, float]], directions: tuple[str, str]) -> list[int]:
    """Indices of the points no other point beats on both axes (`directions`: max or min each)."""
    signs = [1 if d == "max" else -1 for d in directions]
    scaled = [(signs[0] * x, signs[1] * y) for x, y in points]
    return [i for i, (x, y) in enumerate(scaled)
            if not any(ox >= x and oy >= y and (ox, oy) != (x, y) for j, (ox, oy) in enumerate(scaled) if j != i)]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def rows(outcomes: list[Outcome], parameters: list[str], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["trial", "status", *parameters, "step", *metrics, "divergence", "mlflow run", "error"]
    body = [[o.trial_id, o.status, *(_cell(o.params.get(p)) for p in parameters), _cell(o.metrics.get("step")),
             *(_cell(o.metrics.get(m)) for m in metrics), _cell(o.metrics.get("divergence")), o.run_id or "", (o.error or "")[:200]]
            for o in outcomes]
    return header, body


def markdown(outcomes: list[Outcome], parameters: list[str], metrics: list[str], chosen: Outcome | None, rule: str) -> str:
    header, body = rows(outcomes, parameters, metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    verdict = f"Selected: trial {chosen.trial_id} ({rule})." if chosen else f"No trial completed with a finite value: nothing selected ({rule})."
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def to_csv(outcomes: list[Outcome], parameters: list[str], metrics: list[str]) -> str:
    header, body = rows(outcomes, parameters, metrics)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    return out.getvalue()


def pareto_png(outcomes: list[Outcome], reward: str, alignment: str | None, chosen: Outcome | None, path: Path) -> Path:
    """Reward against alignment (when the run reports one) and against divergence; every trial
    with a validation is a point labelled by its trial number, the front is joined, the selected
    trial is ringed. Failed trials have no point (the table lists them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(alignment, "max")] if alignment else []
    panels.append(("divergence", "min"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    markers = {COMPLETED: ("o", "tab:blue"), STOPPED: ("x", "tab:orange"), INTERRUPTED: ("s", "tab:gray")}
    for ax, (other, direction) in zip(axes[0], panels):
        shown = [o for o in outcomes if reward in o.metrics and other in o.metrics and o.status in markers]
        points = [(o.metrics[other], o.metrics[reward]) for o in shown]
        for status, (marker, colour) in markers.items():
            xs = [p for p, o in zip(points, shown) if o.status == status]
            if xs:
                ax.scatter(*zip(*xs), marker=marker, color=colour, label=status, s=50)
        for (x, y), o in zip(points, shown):
            ax.annotate(o.trial_id.rsplit("_", 1)[-1].lstrip("0") or "0", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = sorted((points[i] for i in pareto_front(points, (direction, "max"))), key=lambda p: p[0])
        if len(front) > 1:
            ax.plot(*zip(*front), color="tab:green", lw=1, label="Pareto front")
        if chosen is not None and chosen in shown:
            ax.scatter([chosen.metrics[other]], [chosen.metrics[reward]], s=220, facecolors="none", edgecolors="tab:red", label="selected")
        ax.set_xlabel(f"{other} ({'higher' if direction == 'max' else 'lower'} is better)")
        ax.set_ylabel(f"{reward} (higher is better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("sweep trials: last validation (divergence: last training step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
