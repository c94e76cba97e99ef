"""One pydantic model tree for a whole run, loaded from YAML plus `--set a.b=VALUE` overrides.

Every field is typed and described; unknown keys are refused (`extra="forbid"`). A bad value fails here,
before any model or Ray process starts, as a ConfigError whose lines each name a field path and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distar import safe_yaml, storage
from distar.errors import UserError
from distar.rewards import REWARD_NAMES

BUILT_IN_SOURCES = ("tiny-random", "toy")  # source names, not paths, even where a folder of that name exists
# Non-finite numbers are refused everywhere: a NaN weight would silently poison every step.
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Source = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class GuardSection(Section):
    enabled: bool = Field(False, description="Watch held-out judges at every validation and export the kept generator (distar.run.guard).")
    judges: dict[str, NonNegative] = Field(default_factory=dict, description="Held-out val/* metrics (no `val/`) to their margins: {world/misplaced: 0.02}.")
    patience: int = Field(2, ge=1, description="Validations in a row with the training reward up and a judge fallen that trip the guard.")
    action: Literal["stop", "rollback"] = Field("stop", description="On a trip: stop with the kept generator, or roll back to it and train on.")
    max_rollbacks: int = Field(2, ge=0, description="Rollbacks before a trip stops the run.")


class RunSection(Section):
    name: str = Field("toy", min_length=1, description="Run name; also the MLflow run name.")
    seed: int = Field(0, ge=0, description="Seed for noise, timesteps, prompt order and initialisation.")
    steps: int = Field(1000, ge=1, description="Generator updates to run.")
    output_dir: str = Field("runs/toy", min_length=1, description="Folder for the exported generator, the config and metrics (and checkpoints unless storage_path is set).")
    storage_path: str | None = Field(None, min_length=1, description="Where Ray Train keeps the checkpoints (under checkpoints/): a folder every node sees, "
                                     "or s3://BUCKET/PREFIX (endpoint and credentials as for s3:// sources); default: output_dir. "
                                     "The same location resumes the run.")
    log_every: int = Field(50, ge=1, description="Print a step line every N generator updates.")
    validate_every: int = Field(100, ge=1, description="Score the generator on the validation prompts every N updates (and after the last); logged and reported to Tune as val/*.")
    checkpoint_every: int = Field(250, ge=1, description="Checkpoint both networks, optimiser states, step and RNG every N updates (and at the end).")
    max_consecutive_skips: int = Field(10, ge=1, description="Stop the run after this many updates in a row skipped for a non-finite loss, reward "
                                       "or gradient (no checkpoint is written at the stop: the last one holds the state before it).")
    guard: GuardSection = Field(default_factory=GuardSection, description="The guard against reward hacking (distar.run.guard).")


class LoraSpec(Section):
    rank: int = Field(8, ge=1, description="Adapter rank r, the same for the generator and the fake score.")
    alpha: Positive | None = Field(None, description="LoRA alpha: the adapters' update is scaled by alpha / rank; default: the rank.")
    target_modules: list[Source] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="UNet modules that get adapters, by name or name suffix.")


class ModelSection(Section):
    family: Literal["toy", "sd15", "sdxl"] = Field("toy", description="How prompts condition the UNet. toy, sd15: one CLIP text encoder (SD1.5 "
                                                   "structure); sdxl: two text encoders, pooled text embeddings and size/crop time ids.")
    reference: Source = Field("toy", description="Reference diffusion model: a diffusers folder, hub id, `toy` (the shapes world's) or `tiny-random`.")
    generator_init: str | None = Field(None, description="Initial generator weights in the reference UNet's architecture: a diffusers pipeline or UNet folder, "
                                       "or a state-dict file (.safetensors, .bin, .pt; DMD2's one-step UNets); default: the reference UNet.")
    t_star: int = Field(399, ge=1, description="Timestep at which the one-step generator reads its noise input z as x_t*.")
    num_train_timesteps: int = Field(1000, ge=2, description="Length of the reference's discrete schedule; checked against its scheduler config at load.")
    resolution: int = Field(32, ge=8, description="Generated image side in pixels.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype of every forward; trainable weights and optimiser states stay float32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward passes (generator, fake score, the reference's "
                                         "backward to x_t, the reward VAE decode): about a third more compute for a fraction of the activation memory.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters on one shared frozen base UNet instead of two full UNets (distar.models.lora); null: off.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_float16(cls, value: Any) -> Any:
        if value == "float16":
            raise ValueError("float16 needs loss scaling, which distar does not do; use bfloat16 (float32 masters, bf16 forwards) or float32")
        return value


class ObjectiveSection(Section):
    divergence: Literal["score", "kl"] = Field("score", description="score: DI* score divergence; kl: Diff-Instruct/DI++ (ablation).")
    alpha: NonNegative = Field(1.0, description="Divergence coefficient; 0 trains on rewards alone.")
    distance: Literal["pseudo_huber", "l2"] = Field("pseudo_huber", description="Distance d(y) on the score difference.")
    huber_c: Positive = Field(1.0, description="Pseudo-Huber constant c, in score units per sample.")
    weighting: Literal["x0", "uniform"] = Field("x0", description="Per-timestep weight w(t): x0 = b_t^2/a_t (loss in x0 units), uniform = 1 (score units).")
    t_min: int = Field(20, ge=0, description="Smallest diffusion timestep sampled for the divergence.")
    t_max: int = Field(979, ge=1, description="Largest diffusion timestep sampled for the divergence.")
    cfg_scale: NonNegative = Field(4.5, description="Classifier-free guidance scale w of the reference.")
    cfg_placement: Literal["inside", "outside", "none"] = Field("inside", description="inside: guided reference in the divergence; outside: "
                                                                "guidance as an implicit reward; none: unguided.")


class RewardSpec(Section):
    name: Literal[REWARD_NAMES] = Field(description="Reward model kind.")
    source: Source = Field(description="Reward model weights: folder, s3:// URI, hub id, or `tiny-random`.")
    processor: Source | None = Field(None, description="Tokenizer and image-preprocessing source when the weights' folder has none (PickScore_v1 "
                                     "publishes them in laion/CLIP-ViT-H-14-laion2B-s32B-b79K); same forms as source; default: source.")
    weight: NonNegative = Field(1.0, description="lambda_k; 0 scores and logs the reward without optimising it.")


class OptimizerSpec(Section):
    lr: Positive = Field(1e-4, description="Adam learning rate.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field((0.0, 0.999), description="Adam betas.")
    weight_decay: NonNegative = Field(0.0, description="Decoupled weight decay.")
    eps: Positive = Field(1e-8, description="Adam epsilon.")


class OptimSection(Section):
    generator: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Generator optimiser.")
    fake_score: OptimizerSpec = Field(default_factory=OptimizerSpec, description="Fake-score optimiser.")
    fake_updates_per_step: int = Field(1, ge=1, description="Fake-score updates K per generator update.")
    grad_clip: Positive | None = Field(1.0, description="Global grad-norm clip for both networks; null disables.")
    ema_decay: float | None = Field(None, ge=0, lt=1, description="An EMA of the generator's weights, validated and exported in their place; null: off.")


class DataSection(Section):
    prompts: Source = Field("toy", description="Prompt source: .txt (one a line), .csv/.json with a `prompt` column, `toy` (the shapes world) or `tiny-random`.")
    batch_size: int = Field(8, ge=1, description="Prompts per generator update per trainer worker.")
    validation_prompts: str | None = Field(None, min_length=1, description="Validation prompt source (as data.prompts); default: data.prompts. Its noise is not drawn in training.")
    validation_size: int = Field(32, ge=0, description="Validation prompts, spread over the validation source; 0 turns validation off.")
    validation_features: str | None = Field(None, min_length=1, description="val/ref/*: validation images vs the reference's samples on `reader` or a DINOv2/CLIP folder/hub id.")


class PoolSpec(Section):
    replicas: int = Field(1, ge=1, description="Replicas in the pool.")
    num_cpus: Positive = Field(0.5, description="CPUs per replica (fractions allowed).")
    num_gpus: NonNegative = Field(0.0, description="GPUs per replica (fractions allowed).")
    threads: int | None = Field(None, ge=1, description="Torch threads per replica; default: its num_cpus rounded down, at least 1 (Ray's rule).")
    max_batch_size: int = Field(32, ge=1, description="Most images a replica assembles from concurrent requests into one batch.")
    request_timeout_s: Positive = Field(300.0, description="Seconds a trainer waits on one request before sending it again (5 tries, then the run fails).")


class ClusterSection(Section):
    trainer_workers: int = Field(1, ge=1, description="Ray Train workers, each holding generator and fake score.")
    trainer_cpus: Positive = Field(1.0, description="CPUs per trainer worker.")
    trainer_gpus: NonNegative = Field(0.0, description="GPUs per trainer worker.")
    reward_pool: PoolSpec = Field(default_factory=PoolSpec, description="Reward scoring workers.")
    reference_pool: PoolSpec = Field(
        default_factory=lambda: PoolSpec(threads=2),
        description="Reference inference pool; 2 threads by default: the trainer waits while it runs, so their cores are free.")
    zero_stage: Literal[1, 2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage of the trainer engines: 3 shards parameters, gradients and Adam states over the trainer workers, "
        "2 gradients and Adam states, 1 Adam states. Default: 3 with several workers, 1 with one (nothing to shard: ZeRO-3's per-layer hooks "
        "and ZeRO-2's per-gradient ones would only cost time); 2 with model.lora, whose networks share one base.")
    max_failures: int = Field(3, ge=0, description="Trainer worker-group restarts (from the last checkpoint) before the run fails.")


class TrackingSection(Section):
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI or a local sqlite store.")
    experiment: str = Field("distar", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field("distar-generator", min_length=1, description="Registry name for the finished generator (alias `candidate` marks each new version).")
    grid_every: int = Field(100, ge=1, description="Log an image grid of fixed prompts and noise every N generator updates (and before the first and after the last).")


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="pickscore", source="toy", weight=1.0), RewardSpec(name="clip_score", source="toy", weight=0.1)],
        description="Reward models and their weights.",
    )
    optim: OptimSection = Field(default_factory=OptimSection)
    data: DataSection = Field(default_factory=DataSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    def zero(self) -> int:
        """The ZeRO stage the trainer engines run."""
        several, stage = self.cluster.trainer_workers > 1, self.cluster.zero_stage
        return stage if stage is not None else (1 if not several else 2 if self.model.lora else 3)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        T, obj = self.model.num_train_timesteps, self.objective  # cross-field checks; each message starts with the field path it blames
        if self.model.t_star >= T:
            raise ValueError(f"model.t_star: {self.model.t_star} is outside the schedule [1, {T - 1}]")
        if obj.t_max >= T:
            raise ValueError(f"objective.t_max: {obj.t_max} is outside the schedule [1, {T - 1}]")
        if obj.t_min >= obj.t_max:
            raise ValueError(f"objective.t_min: {obj.t_min} must be below objective.t_max ({obj.t_max})")
        if obj.alpha == 0 and not any(r.weight > 0 for r in self.rewards):
            raise ValueError("rewards: objective.alpha is 0 (reward-only) but no reward has a positive weight; nothing to optimise")
        for pool in ("reward_pool", "reference_pool"):
            limit = getattr(self.cluster, pool).max_batch_size
            if limit < self.data.batch_size:
                raise ValueError(f"cluster.{pool}.max_batch_size: {limit} is below data.batch_size ({self.data.batch_size}), the images one trainer worker sends at once")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: names must be unique (metrics are keyed by name), got {names}")
        guard, trained = self.run.guard, [f"reward/{r.name}" for r in self.rewards if r.weight > 0]
        if guard.enabled and not (guard.judges and self.data.validation_size):
            raise ValueError("run.guard.enabled: the guard watches held-out judges at validations; it needs run.guard.judges and data.validation_size > 0")
        if self.model.lora and self.cluster.zero_stage == 3:  # two engines would each partition the base they share
            raise ValueError("cluster.zero_stage: 3 shards parameters, but with model.lora the generator and the fake score share one frozen base; use 1 or 2")
        for name in set(guard.judges) & set(trained):
            raise ValueError(f"run.guard.judges.{name}: this reward is trained (weight > 0), not held out; give it weight 0 or watch another judge")
        return self


class ConfigError(UserError):
    """A config that cannot run; each line of the message names a field path and what was expected."""

    kind = "config error"


def _format(err: ValidationError) -> str:
    from distar.tracking.store import redact  # a misspelt key may hold a URI with its password
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # cross-field check: the message names its own path
            lines.append(msg)
            continue
        path = ".".join(str(p) for p in e["loc"])
        got = "" if e["type"] == "missing" or isinstance(e["input"], dict) else f" (got {redact(repr(e['input']))})"
        got = got if len(got) <= 80 else ""
        lines.append(f"{path}: {msg}{got}")
    return "\n".join(lines)


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` inside nested dicts/lists, creating dicts for missing keys."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{'.'.join(keys[: i + 1])}: no such list index (list has {len(node)} items)")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys[:i])}: is a value, cannot set {dotted}")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected PATH=VALUE, e.g. objective.alpha=0.5")
    path, raw = text.split("=", 1)
    if not path:
        raise ConfigError(f"--set {text!r}: empty path")
    try:
        return path, safe_yaml.load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: value {raw!r} is not valid YAML ({getattr(e, 'problem', None) or e})") from None


def _merge(base: dict, top: dict) -> dict:
    """Deep-merge mappings; lists and scalars in `top` replace those in `base`."""
    out = dict(base)
    for k, v in top.items():
        if v is None and isinstance(base.get(k), dict):
            v = {}  # an empty section (`objective:` with nothing under it) keeps its defaults
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated once at the end."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {p}: no such file")
        try:
            tree = safe_yaml.load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            reason = " ".join(str(e).split())  # one line, whatever the parser printed
            raise ConfigError(f"--config {p}: not valid YAML: {reason}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {p}: top level must be a mapping of sections")
    # Overrides address the merged tree, so `--set rewards.0.weight=2` reaches a default list.
    tree = _merge(RunConfig().model_dump(mode="json"), tree)
    for text in overrides:
        key, value = parse_override(text)
        set_path(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML for files and terminals: credentials redacted (distar.tracking.store)."""
    from distar.tracking.store import safe_tree

    return yaml.safe_dump(safe_tree(cfg.model_dump(mode="json")), sort_keys=False)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with its local paths absolute: trainer workers and pool replicas run in other
    working directories, and a checkpoint's config must name the same files wherever it resumes."""
    tree = cfg.model_dump(mode="json")
    tree["run"]["output_dir"] = str(Path(cfg.run.output_dir).expanduser().resolve())
    if cfg.run.storage_path and not storage.is_s3(cfg.run.storage_path):
        tree["run"]["storage_path"] = str(Path(cfg.run.storage_path).expanduser().resolve())
    local = lambda v: v is not None and v not in BUILT_IN_SOURCES and Path(v).expanduser().exists()  # noqa: E731
    places = [(tree[s], k) for s, k in (("data", "prompts"), ("data", "validation_prompts"), ("model", "reference"), ("model", "generator_init"))]
    for node, key in places + [(reward, k) for reward in tree["rewards"] for k in ("source", "processor")]:
        if local(node[key]):
            node[key] = str(Path(node[key]).expanduser().resolve())
    return RunConfig.model_validate(tree)
