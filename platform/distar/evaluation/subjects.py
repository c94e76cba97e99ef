"""The rows of an evaluation: what each --model or --reference names, checked before anything loads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distar.errors import UserError
from distar.tracking import store

REFERENCE_STEPS = 50  # how the reference is sampled where a run or a sweep compares with it


@dataclass
class Subject:
    """One row of an evaluation: what to load, and how it shows in MLflow and the table."""

    uri: str  # as given on the command line (or `reference:<source>`)
    label: str
    open: Callable[[], object]  # -> Sampler
    name: str | None = None  # registry name and version
    version: str | None = None
    model_id: str | None = None  # the version's MLflow logged model
    training_run: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    diffusion: tuple[int, float] | None = None  # (steps, cfg) when sampled as a diffusion model
    run_id: str | None = None


def model_subject(uri: str, steps: int, cfg: float, where: store.Store) -> Subject:
    """A --model argument, checked without loading weights: a registry URI must name an existing
    version (in the store `where`), a path must be a model folder. Diffusion models among them
    sample with steps/cfg."""
    from distar.tracking import registry

    if uri.startswith("models:/"):
        name, version = registry.resolve_version(uri, where)
        mv = where.client().get_model_version(name, version)
        model_id = getattr(mv, "model_id", None) or (mv.source.removeprefix("models:/") if (mv.source or "").startswith("models:/m-") else None)
        pinned = f"models:/{name}/{version}"  # an alias may move while we work
        trained_as = f" ({mv.tags['distar.run_name']})" if mv.tags.get("distar.run_name") else ""  # the training run's name
        return Subject(uri, f"{name} v{version}{trained_as}", lambda: _open(pinned, steps, cfg, where), name, version, model_id, mv.run_id)
    if uri.startswith("runs:/"):
        return Subject(uri, uri, lambda: _open(uri, steps, cfg, where), training_run=uri.removeprefix("runs:/").split("/", 1)[0])
    path = Path(uri).expanduser()
    if "://" in uri or not ((path / "model_index.json").is_file() or (path / "MLmodel").is_file()):
        raise UserError(f"--model: {store.redact(uri)}: not a models:/ or runs:/ URI, an MLflow model folder nor a diffusers pipeline folder")
    return Subject(uri, str(path), lambda: _open(str(path), steps, cfg, where))


def _open(uri: str, steps: int, cfg: float, where: store.Store):
    """registry.load's Sampler; a diffusion model samples with `steps` at guidance `cfg`."""
    from distar.tracking import registry

    model = registry.load(uri, where).model
    if model.t_star is None:
        model.steps, model.cfg = steps, cfg
    return model


def reference_subject(source: str, family: str, steps: int, cfg: float, device: str = "cpu") -> Subject:
    """The reference diffusion model, sampled with `steps` DDIM steps at guidance `cfg`."""
    from distar.models import sources
    from distar.models.sampling import Sampler
    from distar.storage import cache_dir

    folder = sources.resolve(source, family, cache_dir(), "--reference")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--reference: {folder} is not a diffusers pipeline folder (no model_index.json)")
    label = f"reference {store.redact(source)} ({steps} steps, cfg {cfg:g})"
    return Subject(f"reference:{store.redact(source)}", label, lambda: Sampler(folder, steps, cfg, device=device))


def reference_samples(cfg, prompts: list[str], device: str = "cpu"):
    """The run config's reference model's images of `prompts` [N, 3, H, W] in [0, 1]: REFERENCE_STEPS
    DDIM steps at the run's guidance, noise from the held-out seed, as validation draws its own."""
    from distar.data import HELD_OUT_SEED

    model = reference_subject(cfg.model.reference, cfg.model.family, REFERENCE_STEPS, cfg.objective.cfg_scale, device).open()
    return model.generate(prompts, list(range(HELD_OUT_SEED, HELD_OUT_SEED + len(prompts))))
