"""The finished generator in the MLflow model registry.

A generator is logged as a pyfunc model whose one artifact is its diffusers folder (with the
one-step LCM scheduler, `distar.json` and a model card, README.md). Its signature takes rows of
{prompt, seed?, num_images?} and returns one row per image {prompt, seed, image (PNG bytes)}.
Each registered version gets alias `candidate`; jobs/promote.py moves `champion`.

`load(uri)` is how evaluation and serving open any model: a registry URI (`models:/name@alias`,
`models:/name/3`), a run artifact (`runs:/<run id>/generator`), a logged MLflow model folder or a
plain diffusers folder. It reads files only: the code stored with a model never runs in distar
(MLflow's own `mlflow.pyfunc.load_model` does run it, for users who trust their registry).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from importlib.metadata import version as installed
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from distar.config import RunConfig
from distar.errors import UserError
from distar.models.lora import WEIGHTS_NAME
from distar.models.sampling import Sampler
from distar.tracking import store

ARTIFACT = "generator"  # the model's path in its run
MODEL_URI_TAG = "distar.model_uri"  # where a run's logged generator is
CANDIDATE, CHAMPION = "candidate", "champion"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False), ColSpec("long", "num_images", required=False)]),
    outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("binary", "image")]),
)
REQUIREMENTS = ("torch", "diffusers", "transformers", "mlflow", "pillow", "pandas")


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def expand(prompts: list[str], seeds: list[int], counts: list[int]) -> tuple[list[str], list[int]]:
    """Requests (prompt, seed, n) -> n images each, with seeds seed, seed+1, ..."""
    flat = [(p, s + i) for p, s, n in zip(prompts, seeds, counts) for i in range(n)]
    return [p for p, _ in flat], [s for _, s in flat]


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a pipeline folder: a table of requests in, a table of PNGs out."""

    def load_context(self, context) -> None:
        self.model = Sampler(context.artifacts["pipeline"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        n = len(model_input)
        column = lambda name, default: [int(v) if pd.notna(v) else default for v in model_input.get(name, pd.Series([default] * n))]  # noqa: E731
        prompts, seeds = expand(list(model_input["prompt"]), column("seed", 0), column("num_images", 1))
        from distar.images import to_uint8

        images = [png(p) for p in to_uint8(self.model.generate(prompts, seeds))]
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "image": images})


def adapter_line(cfg: RunConfig) -> str:
    """What a LoRA run's folder holds besides the merged UNet (distar.models.lora)."""
    spec = cfg.model.lora
    if spec is None:
        return "- Training: full fine-tuning of the UNet\n"
    base = store.redact(cfg.model.generator_init or cfg.model.reference)
    return (f"- Training: a LoRA adapter (rank {spec.rank}, alpha {spec.alpha or spec.rank:g}, on {', '.join(spec.target_modules)}); unet/ "
            f"holds it merged into its base, and `{WEIGHTS_NAME}` the adapter alone: `pipe.load_lora_weights(folder)` on a pipeline of `{base}`\n")


def model_card(cfg: RunConfig, metrics: dict[str, float], t_star: int) -> str:
    rewards = ", ".join(f"{r.name} (weight {r.weight:g})" for r in cfg.rewards)
    shown = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if not k.startswith("system/"))
    return f"""---
library_name: diffusers
tags: [distar, diff-instruct-star, one-step, text-to-image]
---
# {cfg.run.name}: a one-step generator trained with Diff-Instruct*

- Reference: `{store.redact(cfg.model.reference)}` ({cfg.model.family}), initialised from {store.redact(cfg.model.generator_init or 'the reference UNet')}
- Objective: {cfg.objective.divergence} divergence, alpha {cfg.objective.alpha:g}, CFG {cfg.objective.cfg_scale:g} {cfg.objective.cfg_placement}
- Rewards: {rewards}
- Steps: {cfg.run.steps} generator updates of batch {cfg.data.batch_size} per worker x {cfg.cluster.trainer_workers} workers, seed {cfg.run.seed}
- Weights: {f"the exponential moving average of the generator's weights, decay {cfg.optim.ema_decay:g}" if cfg.optim.ema_decay is not None else "the generator's own (no EMA)"}
{adapter_line(cfg)}- Sampling: one step at t* = {t_star} (the folder's LCM scheduler with `timesteps=[{t_star}]`, guidance scale 1)

## Last logged metrics

| metric | value |
| --- | --- |
{shown}
"""


def log_generator(client: mlflow.MlflowClient, run_id: str, folder: Path, cfg: RunConfig) -> str:
    """Log `folder` into run `run_id` as a pyfunc model (with a model card); returns its model URI,
    also kept as the run's `distar.model_uri` tag."""
    from distar.models.sampling import one_step_timestep

    metrics = client.get_run(run_id).data.metrics
    (folder / "README.md").write_text(model_card(cfg, metrics, one_step_timestep(folder)))
    # log_model writes into the active run; no input example, which MLflow would run through the model
    with mlflow.start_run(run_id=run_id, log_system_metrics=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*")
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT, python_model=str(Path(__file__).with_name("pyfunc_code.py")), artifacts={"pipeline": str(folder)},
            signature=SIGNATURE, pip_requirements=[f"{p}=={installed(p)}" for p in REQUIREMENTS],
        )
    client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def register_logged(client: mlflow.MlflowClient, model_uri: str, cfg: RunConfig):
    """Register a logged generator under `tracking.registered_model` and point alias `candidate`
    at the new version. Returns the model version. A generator registered before (a sweep that
    crashed after registering its selection concludes again) keeps its version: one model, one version."""
    name = cfg.tracking.registered_model
    earlier = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == model_uri]
    if earlier:
        version = earlier[0].version
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*await_registration_for.*")
            version = mlflow.register_model(model_uri, name, await_registration_for=0).version
    client.set_registered_model_alias(name, CANDIDATE, str(version))
    client.set_model_version_tag(name, str(version), "distar.run_name", cfg.run.name)
    return client.get_model_version(name, str(version))


def register(client: mlflow.MlflowClient, run_id: str, folder: Path, cfg: RunConfig):
    """Log `folder` into run `run_id` and register it with alias `candidate`."""
    return register_logged(client, log_generator(client, run_id, folder, cfg), cfg)


@dataclass
class Loaded:
    model: Sampler
    uri: str
    name: str | None = None  # registered model name and version, when loaded from the registry
    version: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.uri


def resolve_version(uri: str, where: store.Store) -> tuple[str, str]:
    """`models:/name@alias` or `models:/name/N` -> (name, version), by asking the registry of `where`."""
    from mlflow.exceptions import MlflowException

    body, client = uri.removeprefix("models:/"), where.client()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, client.get_model_version_by_alias(name, alias).version
        name, _, number = body.rpartition("/")
        if not name or not number.isdigit():
            raise UserError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return name, client.get_model_version(name, number).version
    except MlflowException as e:
        raise UserError(f"{uri}: not in the registry at {store.redact(where.uri)} ({e.error_code})") from None


def load(uri: str, where: store.Store | None = None) -> Loaded:
    """Open any generator location (see the module docstring) as an Sampler; registry and run
    URIs are read from the store `where` (default: store.resolve()), to which this process connects."""
    from mlflow.exceptions import MlflowException

    name = version = None
    remote = uri.startswith(("models:/", "runs:/")) or "://" in uri
    if remote:
        where = where or store.resolve()
        store.connect(where)  # MLflow downloads models:/ and runs:/ artifacts from the connected store
    if uri.startswith("models:/"):
        name, version = resolve_version(uri, where)
        uri = f"models:/{name}/{version}"  # pin the version: an alias may move while we load
    local = Path(uri).expanduser()
    if not remote and (local / "model_index.json").is_file():
        return Loaded(Sampler(local), str(local))
    if not remote and not (local / "MLmodel").is_file():
        raise UserError(f"{uri}: not a diffusers pipeline folder, an MLflow model folder, nor a models:/ or runs:/ URI")
    if remote:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))  # files only: nothing in them runs
        except (MlflowException, OSError) as e:
            raise UserError(f"{uri}: cannot load the model ({str(e).splitlines()[0][:300]})") from None
    return Loaded(Sampler(pipeline_folder(local, uri)), uri, name, version)


def pipeline_folder(model: Path, uri: str) -> Path:
    """The diffusers folder inside a logged generator, found by reading its MLmodel file as data.
    The model's stored code (pyfunc_code.py) is never run here, so whoever can write the registry
    cannot run code in evaluation, promotion or serving; the weights load from safetensors."""
    from distar import safe_yaml

    try:
        meta = safe_yaml.load((model / "MLmodel").read_text())
        path = meta["flavors"]["python_function"]["artifacts"]["pipeline"]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{uri}: an MLflow model, but not a distar generator (its MLmodel names no pipeline: {type(e).__name__})") from None
    folder = (model / str(path)).resolve()
    if not folder.is_relative_to(model.resolve()) or not (folder / "distar.json").is_file():
        raise UserError(f"{uri}: an MLflow model, but not a distar generator (no one-step pipeline folder at {str(path)[:200]!r})")
    return folder
