"""What a sweep leaves a person to read and act on: one row per trial (its values, its status,
its last validation, the constraints it fails) and the reference's row where the selection needs
it, the trial the space's rule selected (distar.sweep.selection), and a Pareto plot of reward
against alignment, realism and divergence with every trial marked.
"""

from __future__ import annotations

import csv
import io
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


def rows(outcomes: list[Outcome], parameters: list[str], metrics: list[str], limits: dict[str, float],
         reference: dict[str, float] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per trial (`unmet`: the constraints it fails), the reference's first when given."""
    from distar.sweep.selection import unmet

    header = ["trial", "status", *parameters, "step", *metrics, "divergence", "unmet", "mlflow run", "error"]
    body = [["reference", "reference model", *([""] * len(parameters)), "", *(_cell(reference.get(m)) for m in metrics), "", "", "", ""]] if reference else []
    body += [[o.trial_id, o.status, *(_cell(o.params.get(p)) for p in parameters), _cell(o.metrics.get("step")),
              *(_cell(o.metrics.get(m)) for m in metrics), _cell(o.metrics.get("divergence")),
              "; ".join(unmet(o.metrics, limits)) if o.metrics else "", o.run_id or "", (o.error or "")[:200]]
             for o in outcomes]
    return header, body


def markdown(outcomes: list[Outcome], parameters: list[str], metrics: list[str], chosen: Outcome | None, rule: str,
             limits: dict[str, float], reference: dict[str, float] | None = None) -> str:
    header, body = rows(outcomes, parameters, metrics, limits, reference)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    verdict = f"Selected: trial {chosen.trial_id} ({rule})." if chosen else f"No completed trial with a finite value meets the rule: nothing selected ({rule})."
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def to_csv(outcomes: list[Outcome], parameters: list[str], metrics: list[str], limits: dict[str, float],
           reference: dict[str, float] | None = None) -> str:
    header, body = rows(outcomes, parameters, metrics, limits, reference)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    return out.getvalue()


def pareto_png(outcomes: list[Outcome], reward: str, axes: list[str], chosen: Outcome | None, path: Path,
               limits: dict[str, float], reference: dict[str, float] | None = None) -> Path:
    """Reward against each of `axes` (alignment, realism, divergence: whichever the run reports);
    every trial with a validation is a point labelled by its trial number, the front is joined,
    the selected trial is ringed, the reference is a star, a constraint's bound a dashed line.
    Failed trials have no point (the table lists them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distar.evaluation.judges import lower_is_better

    fig, grid = plt.subplots(1, len(axes), figsize=(6 * len(axes), 4.8), squeeze=False)
    markers = {COMPLETED: ("o", "tab:blue"), STOPPED: ("x", "tab:orange"), INTERRUPTED: ("s", "tab:gray")}
    for ax, other in zip(grid[0], axes):
        direction = "min" if other == "divergence" or lower_is_better(other) else "max"
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
        if reference and other in reference and reward in reference:
            ax.scatter([reference[other]], [reference[reward]], marker="*", s=200, color="black", label="reference")
        if other in limits:
            ax.axvline(limits[other], color="tab:red", ls="--", lw=1, label=f"required {'<=' if direction == 'min' else '>='} {limits[other]:.3g}")
        if reward in limits:
            ax.axhline(limits[reward], color="tab:red", ls=":", lw=1)
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
