"""The markdown tables: an evaluation's rows with ratios, and promote.py's two versions side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence

from distar.evaluation.judges import ACCURACIES, MANIFOLD, WORLD
from distar.evaluation.subjects import Subject

WORLD_DISTRIBUTION = ("world/fid", *(f"world/{k}" for k in MANIFOLD))  # judges.world_distribution's
AGAINST_REFERENCE = ("ref/fid", *(f"ref/{k}" for k in MANIFOLD))  # measure.AgainstReference's
# Table headings; metrics not listed here are shown under their own names.
HEADINGS = {
    "pref": "pref", "diversity": "diversity", "seconds_per_image": "s/image", "peak_memory_mb": "peak MB", "unet_calls": "UNet calls",
    **{f"acc/{k}": f"acc {k}" for k in ACCURACIES}, "world/misplaced": "misplaced", "world/off_world": "off-world",
    "world/fid": "FID (world)", **{k: k.removeprefix("world/") for k in WORLD_DISTRIBUTION[1:]},
    **{k: f"{k.removeprefix('ref/').replace('fid', 'FID')} (ref)" for k in AGAINST_REFERENCE},
}


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def columns(subjects: Sequence[Subject]) -> list[str]:
    """Metric keys in table order: rewards, reader, diversity, cost."""
    keys = list(dict.fromkeys(k for s in subjects for k in s.metrics))  # first seen first: rewards in config order
    order = [k for k in keys if k.startswith("reward/")]
    judged = ("pref", *(f"acc/{a}" for a in ACCURACIES), *WORLD, *WORLD_DISTRIBUTION, *AGAINST_REFERENCE)
    order += [k for k in (*judged, "diversity", "seconds_per_image", "peak_memory_mb", "unet_calls") if k in keys]
    return order + [k for k in keys if k not in order]


def markdown(subjects: Sequence[Subject], baseline: Subject, notes: Sequence[str] = ()) -> str:
    """One row per model; each cell `value (ratio x)` against the baseline row."""
    keys = columns(subjects)
    heads = [HEADINGS.get(k, k.removeprefix("reward/")) for k in keys]
    lines = ["| model | " + " | ".join(heads) + " |", "|---" * (len(keys) + 1) + "|"]
    for s in subjects:
        cells = []
        for k in keys:
            value = s.metrics.get(k, float("nan"))
            if s is baseline:
                cells.append(fmt(value))
            elif k not in s.ratios:  # the baseline's value is 0 or missing
                cells.append(f"{fmt(value)} (n/a)")
            else:
                cells.append(f"{fmt(value)} ({s.ratios[k]:.3g}x)")
        name = f"{s.label} (baseline)" if s is baseline else s.label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"


def side_by_side(old: tuple[str, dict[str, float]] | None, new: tuple[str, dict[str, float]]) -> str:
    """Markdown, a row per metric: the old version's value, the new one's and new minus old (only
    the new column when there is no old one)."""
    (nname, nm), om = new, (old[1] if old else {})
    keys = columns([Subject("", "", lambda: None, metrics={**om, **nm})])
    if old is None:
        lines = [f"| metric | {nname} |", "|---|---|"] + [f"| {k} | {fmt(nm.get(k, float('nan')))} |" for k in keys]
        return "\n".join(lines)
    lines = [f"| metric | {old[0]} | {nname} | difference |", "|---|---|---|---|"]
    for k in keys:
        a, b = om.get(k, float("nan")), nm.get(k, float("nan"))
        diff = f"{b - a:+.4g}" if math.isfinite(a) and math.isfinite(b) else "n/a"
        lines.append(f"| {k} | {fmt(a)} | {fmt(b)} | {diff} |")
    return "\n".join(lines)


def notes(evaluation_id: str, request, prompts: list[str], rewards, baseline: Subject, judges, k: int, device: str) -> list[str]:
    """The lines under an evaluation's table: what was measured, on what, and how."""
    import torch

    from distar.evaluation.measure import memory_method
    from distar.tracking.store import redact

    spread = f" (spread evenly over the source, --limit {request.limit})" if request.limit else ""
    return [
        f"evaluation {evaluation_id}: {len(prompts)} prompts from `{redact(request.prompts)}`{spread}, image i from noise seed {request.seed} + i",
        f"cells: value (ratio to the baseline row, {baseline.label}), all measured in this one invocation",
        f"rewards: {', '.join(f'{r.name} ({redact(r.source)})' for r in rewards) or 'none configured'}"
        + ("; pref and acc: the shapes-world reader" if judges.reader is not None else ""),
        f"diversity: mean RMS pixel distance (pixels in [0, 1]) between two images of the same prompt from two noise seeds, over the first {k} prompts",
        f"s/image: wall time to generate all {len(prompts)} images after a warm-up call, over {len(prompts)}, on {device}"
        + (f", torch threads: {torch.get_num_threads()}" if device == "cpu" else ""),
        f"peak MB: {memory_method(device)}",
        "UNet calls: network evaluations per image (steps x 2 with classifier-free guidance)",
    ]
