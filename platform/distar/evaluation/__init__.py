"""Evaluating generators side by side, in one process, on the same prompts and noise.

Every model of one evaluation samples the same prompts with the same noise seeds (image i from
seed + i) and is measured the same way:

- `reward/<name>`: the mean score of each reward model the run config lists (PickScore, CLIP
  score, HPSv2.1, ImageReward, aesthetic, ...), on the images as generated.
- `pref`, `acc/size|color|shape|position|all`: the shapes-world reader's mean pref and its
  alignment accuracies (distar.evaluation.judges), when every prompt is a shapes-world prompt.
- `world/misplaced`, `world/off_world`: there too, the world-faithfulness check's mean share of a
  shape's area that no outline the world draws explains, and the share of images over its
  tolerance (distar.toy.faithfulness): the reader names the nearest class, this sees the outline.
- `world/precision|recall|density|coverage`, `world/fid`: there too, the images against 4 world
  renders of each of their prompts (the world's sampler at the held-out seed) on the reader's features
  (distar.evaluation.distribution; FID from 64 images, biased upwards at small N: compare models
  at the same N). Precision and density fall when images leave the world, recall and coverage
  when a model collapses onto part of it.
- `ref/precision|recall|density|coverage`, `ref/fid`: with --reference, each model's images
  against the reference's samples of the same prompts and seeds, on the reader's features in the
  shapes world or on a feature network named by --features (DINOv2 or CLIP,
  distar.evaluation.features; it also makes FID required, so it needs 64 prompts or more).
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

from collections.abc import Callable
from dataclasses import dataclass, field

from distar.data import HELD_OUT_SEED
from distar.errors import UserError
from distar.evaluation import measure, runs, subjects, table
from distar.evaluation.judges import load_judges
from distar.evaluation.subjects import Subject


@dataclass(frozen=True)
class Request:
    """What to evaluate and how (jobs/evaluate.py's arguments)."""

    prompts: str  # a prompt source
    models: list[str] = field(default_factory=list)  # registry URIs, run artifacts, MLflow or diffusers folders
    reference: str | None = None  # a reference diffusion model, sampled with `steps` at guidance `cfg`
    steps: int = 50
    cfg: float | None = None  # default: the run config's objective.cfg_scale
    limit: int | None = None  # prompts spread evenly over the source
    seed: int = HELD_OUT_SEED  # image i from noise seed seed + i
    diversity_prompts: int = 16
    baseline: str | None = None  # `reference` or one of `models`; default: the first row
    config: str | None = None  # the run config whose rewards and tracking store are used
    overrides: list[str] = field(default_factory=list)
    tracking_uri: str | None = None
    device: str | None = None  # default: cuda when there is one
    features: str | None = None  # the feature network of the ref/* metrics (distar.evaluation.features)


@dataclass
class Report:
    table: str  # markdown, with notes
    subjects: list[Subject]
    runs: runs.EvaluationRuns


def run(request: Request, log: Callable[[str], None] = print) -> Report:
    """Check every input (before any model loads), then measure every model and the reference on
    the same prompts and noise, log a run per model, and return the table of values and ratios."""
    from distar.config import load_config
    from distar.data import load_prompts, spread
    from distar.run.build import check_rewards
    from distar.tracking import store

    cfg = load_config(request.config, request.overrides)
    prompts = load_prompts(request.prompts, "--prompts")
    if request.limit is not None:
        if request.limit < 1:
            raise UserError(f"--limit: must be at least 1 (got {request.limit})")
        prompts = spread(prompts, request.limit)
    check_rewards(cfg)
    device = _device(request.device)
    cfg_scale = request.cfg if request.cfg is not None else cfg.objective.cfg_scale
    evaluation_id, k = runs.new_evaluation_id(), min(request.diversity_prompts, len(prompts))
    params = {"prompts": store.redact(request.prompts), "prompt_count": str(len(prompts)), "seed": str(request.seed), "diversity_prompts": str(k),
              "device": device, "memory_method": measure.memory_method(device), **{f"reward.{r.name}": store.redact(r.source) for r in cfg.rewards}}
    where = store.resolve(request.tracking_uri or cfg.tracking.mlflow_uri)
    tracked = runs.EvaluationRuns(where, cfg.tracking.experiment, evaluation_id, params, prompts, request.prompts)
    rows = [subjects.reference_subject(request.reference, cfg.model.family, request.steps, cfg_scale, device)] if request.reference else []
    rows += [subjects.model_subject(uri, request.steps, cfg_scale, where) for uri in request.models]  # every URI checked before any model loads
    baseline = _baseline(rows, request)
    if request.reference == "tiny-random" or any(r.source == "tiny-random" for r in cfg.rewards):
        log("note: tiny-random (untrained) models: the scores show the machinery works, not image quality.")
    judges = load_judges(cfg, prompts, device)
    versus = _against_reference(request, rows, judges, prompts, device)
    notes = table.notes(evaluation_id, request, prompts, cfg.rewards, baseline, judges, k, device)
    with tracked:
        text = measure.measure_all(rows, baseline, prompts, request.seed, judges, tracked, notes, k, device, log=log, versus=versus)
    return Report(text, rows, tracked)


def _against_reference(request: Request, rows: list[Subject], judges, prompts: list[str], device: str) -> measure.AgainstReference | None:
    """The ref/* metrics' comparison: on --features, else in the shapes world on the reader's features."""
    from distar.evaluation.distribution import FID_MIN
    from distar.evaluation.features import load_features

    if request.features is None and (judges.reader is None or not request.reference):
        return None
    if not request.reference:
        raise UserError("--features: the distribution metrics compare each model's images with the reference's samples; add --reference")
    if request.features is not None and len(prompts) < FID_MIN:
        raise UserError(f"--features: FID needs at least {FID_MIN} images a set, and {len(prompts)} prompts give {len(prompts)}; evaluate more prompts")
    return measure.AgainstReference(load_features(request.features, device) if request.features else judges.reader.features, rows[0])


def _device(asked: str | None) -> str:
    import torch

    device = asked or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA device on this machine")
    return device


def _baseline(rows: list[Subject], request: Request) -> Subject:
    """The row ratios are taken against: the one --baseline names, else the first."""
    if not request.baseline:
        return rows[0]
    given = (["reference"] if request.reference else []) + list(request.models)
    named = [s for s, name in zip(rows, given) if name == request.baseline]
    if not named:
        raise UserError(f"--baseline: {request.baseline!r} is neither `reference` (with --reference) nor one of the --model arguments")
    return named[0]

