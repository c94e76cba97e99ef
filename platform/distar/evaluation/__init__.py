"""Evaluating generators side by side, in one process, on the same prompts and noise.

Every model of one evaluation samples the same prompts with the same noise seeds (image i from
seed + i) and is measured the same way:

- `reward/<name>`: the mean score of each reward model the run config lists (PickScore, CLIP
  score, HPSv2.1, ImageReward, aesthetic, ...), on the images as generated.
- `pref`, `acc/size|color|shape|position|all`: the shapes-world reader's mean pref and its
  alignment accuracies (distar.toy.judge's reader), when every prompt is a shapes-world prompt.
- `diversity`: the mean, over the first K prompts, of the RMS pixel distance (pixels in [0, 1])
  between two images of the same prompt from two noise seeds (seed + i and seed + N + i); 0 when
  a model ignores its noise. Needs no network and no model, so it means the same for any family.
- `seconds_per_image`: wall time of generating all N images (after a warm-up call), over N.
- `peak_memory_mb`: on CUDA, torch.cuda.max_memory_allocated while generating (weights
  included); on the CPU, the peak rise of the process's resident memory above what it held just
  before generating (weights excluded), sampled by a thread every 2 ms. `MEMORY_METHOD` says which.
- `unet_calls`: UNet evaluations per image (1 for a one-step generator, steps x 2 for a guided
  diffusion model).

Ratios of every metric against a baseline row (the reference, or the first model) are computed
from the same invocation's measurements, never across invocations: timings depend on the machine.

MLflow: one run per evaluated model (`distar.kind=evaluation`, one shared `distar.evaluation_id`
per invocation), with `eval/<metric>` and `eval/ratio/<metric>`; a registry model's metrics are
also tied to its logged model (they appear on the model version's page) and the version gets a
`distar.evaluation_run` tag. `runs.evaluation_runs` finds them again for jobs/promote.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from distar.evaluation.measure import Judges, measure_model, ratios, release_freed_memory
from distar.evaluation.runs import PREFIX, RATIO_PREFIX, EvaluationRuns
from distar.evaluation.subjects import Subject
from distar.evaluation.table import fmt, markdown


def evaluate(subjects: list[Subject], baseline: Subject, prompts: list[str], seed: int, judges: Judges, runs: EvaluationRuns | None,
             notes: Sequence[str] = (), diversity_prompts: int = 16, device: str = "cpu", log: Callable[[str], None] = print) -> str:
    """Measure every subject in turn (one model in memory at a time), then the ratios against
    `baseline`; log it all when `runs` is given. Returns the markdown table."""
    for s in subjects:
        log(f"evaluating {s.label} ...")
        start = time.perf_counter()
        model = s.open()
        model.pipe.to(device)
        if model.t_star is None:
            s.diffusion = (model.steps, model.cfg)
        s.metrics, images = measure_model(model, prompts, seed, judges, diversity_prompts, device)
        del model
        if runs is not None:
            runs.start(s)
            runs.log_metrics(s, {PREFIX + k: v for k, v in s.metrics.items()})
            runs.log_images(s, images)
        log(f"  done in {time.perf_counter() - start:.1f} s: " + ", ".join(f"{k} {fmt(v)}" for k, v in s.metrics.items()))
        del images
        release_freed_memory()
    for s in subjects:
        s.ratios = ratios(s.metrics, baseline.metrics)
        if runs is not None:
            runs.log_metrics(s, {RATIO_PREFIX + k: v for k, v in s.ratios.items()})
    table = markdown(subjects, baseline, notes)
    if runs is not None:
        runs.finish(subjects, table)
    return table
