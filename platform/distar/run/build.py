"""Every piece of a run built from its RunConfig, the same way in one process, in a Ray Train
worker and in a pool replica.

Sources resolve first (a missing model fails before anything loads); every role loads only what
it holds: reward workers the VAE and reward models, reference workers the reference UNet and
text encoder(s), the trainer the generator, the fake score and the text encoder(s).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from distar.config import ConfigError, RunConfig
from distar.data import load_prompts, validation_prompts
from distar.errors import UserError
from distar.models import lora, precision, sources
from distar.models.diffusion import Denoiser, DiffusionParts, OneStepGenerator, check_pipeline_folder, decode_latents, load_parts, load_vae
from distar.rewards import REWARDS, MissingProcessorError, load_reward
from distar.roles.reference_worker import ReferenceWorker
from distar.roles.reward_worker import RewardWorker
from distar.storage import cache_dir


def check_inputs(cfg: RunConfig) -> None:
    """Fail with a ConfigError on a prompt or model source of the config that cannot work, before
    anything starts (no model is downloaded; an s3:// model is checked to exist and to be readable)."""
    try:
        validation_prompts(cfg.data.prompts, cfg.data.validation_prompts, cfg.data.validation_size)
        load_prompts(cfg.data.prompts)
        m = cfg.model
        reference = sources.resolve(m.reference, m.family, cache_dir(), "model.reference", fetch=False)
        if reference is not None:  # here already: look inside
            try:
                check_pipeline_folder(reference)
            except UserError as e:
                raise ConfigError(f"model.reference: {e.message}") from None
        if m.generator_init is not None:
            sources.resolve(m.generator_init, m.family, cache_dir(), "model.generator_init", fetch=False, files="unet")
        check_lora(cfg)
        check_rewards(cfg)
        check_validation_features(cfg)
        check_guard(cfg)
    except ConfigError:
        raise
    except UserError as e:  # a value of the config names what cannot be read
        raise ConfigError(e.message) from None


def check_lora(cfg: RunConfig) -> None:
    """model.lora's targets name modules of the reference UNet, built from its config on the meta
    device (no weights, no download; an architecture not known here is checked when adapters are added)."""
    from distar.plan.architectures import CannotPlan, pipeline

    if cfg.model.lora is None:
        return
    try:
        unet = pipeline(cfg).unet
    except CannotPlan:
        return
    with torch.device("meta"):
        lora.check_targets(unet.build(), cfg.model.lora.target_modules)


def check_guard(cfg: RunConfig) -> None:
    """Every judge the guard watches is a validation metric this run reports."""
    from distar.run.validation import PREFIX, unreported

    for name in cfg.run.guard.judges if cfg.run.guard.enabled else ():
        reason = unreported(cfg, PREFIX + name)
        if reason:
            raise ConfigError(f"run.guard.judges.{name}: {reason}")


def check_validation_features(cfg: RunConfig) -> None:
    """data.validation_features names features this run's validation images can be compared on."""
    from distar.evaluation.features import feature_config
    from distar.evaluation.judges import READER_SIZE, reader_reads
    from distar.run.validation import READER

    source, field = cfg.data.validation_features, "data.validation_features"
    if source is None:
        return
    prompts = validation_prompts(cfg.data.prompts, cfg.data.validation_prompts, cfg.data.validation_size)
    if not prompts:
        raise ConfigError(f"{field}: compares validation images with the reference's samples, but validation is off (data.validation_size is 0)")
    if source == READER and not reader_reads(prompts, cfg.model.resolution):
        raise ConfigError(f"{field}: the reader reads only the shapes world's prompts at {READER_SIZE} px; name a DINOv2 or CLIP model instead")
    if source != READER and (Path(source).exists() or source.startswith(("/", ".", "~"))):  # a hub id is read when validation starts
        feature_config(source, field)


def check_rewards(cfg: RunConfig) -> None:
    """Every reward source can be had (as check_inputs checks them; for jobs that only score)."""
    for i, r in enumerate(cfg.rewards):
        sources.resolve(r.source, r.name, cache_dir(), f"rewards.{i}.source", fetch=False)
        if r.processor is not None:
            if not REWARDS[r.name].processor:
                raise UserError(f"rewards.{i}.processor: {r.name} reads no tokenizer or preprocessing config; "
                                f"only {', '.join(n for n, e in REWARDS.items() if e.processor)} take a processor source")
            sources.resolve(r.processor, r.name, cache_dir(), f"rewards.{i}.processor", fetch=False, files="processor")


def dtype_of(cfg: RunConfig) -> torch.dtype:
    return precision.DTYPES[cfg.model.dtype]


def checkpointed(cfg: RunConfig, module: torch.nn.Module) -> torch.nn.Module:
    """The module, recomputing its activations in backward passes if the config asks (diffusers' own switch)."""
    if cfg.model.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    return module


def reference_folder(cfg: RunConfig) -> Path:
    return sources.resolve(cfg.model.reference, cfg.model.family, cache_dir(), "model.reference")


def reference_parts(cfg: RunConfig, device: torch.device | str = "cpu", trainer: bool = False) -> DiffusionParts:
    """The reference's parts in model.dtype; a trainer's UNet in float32, the masters it initialises
    (with model.lora, in model.dtype: the frozen base of the adapters)."""
    m, dtype = cfg.model, dtype_of(cfg)
    precision.check_device(dtype, device)
    unet_dtype = torch.float32 if trainer and m.lora is None else dtype
    return load_parts(reference_folder(cfg), m.num_train_timesteps, dtype, m.family, m.resolution, unet_dtype).to(device)


def reward_models(cfg: RunConfig, device: torch.device | str = "cpu") -> dict:
    """The config's reward models by name, frozen, on `device`, in model.dtype like every frozen network."""
    models = {}
    for i, r in enumerate(cfg.rewards):
        folder = sources.resolve(r.source, r.name, cache_dir(), f"rewards.{i}.source")
        processor = None if r.processor is None else sources.resolve(r.processor, r.name, cache_dir(), f"rewards.{i}.processor", files="processor")
        try:
            models[r.name] = load_reward(r.name, folder, processor).to(device=device, dtype=dtype_of(cfg)).eval()
        except MissingProcessorError as e:
            raise MissingProcessorError(e.folder, f"rewards.{i}.processor") from None
    return models


def reward_worker(cfg: RunConfig, device: torch.device | str = "cpu") -> RewardWorker:
    vae = checkpointed(cfg, load_vae(reference_folder(cfg), dtype_of(cfg))).to(device)
    return RewardWorker(functools.partial(decode_latents, vae), reward_models(cfg, device))


def reference_worker(cfg: RunConfig, parts: DiffusionParts) -> ReferenceWorker:
    """The reference worker over `parts`, computing in model.dtype (in one process it shares the
    trainer's float32 UNet; a pool replica loads it in model.dtype)."""
    return ReferenceWorker(Denoiser(checkpointed(cfg, parts.unet), parts.schedule, dtype_of(cfg)), parts.conditioner)


def trainable_networks(cfg: RunConfig, parts: DiffusionParts) -> tuple[OneStepGenerator, Denoiser]:
    """The generator (from generator_init, else a copy of the reference UNet) and the fake score
    (a copy of the reference UNet); with model.lora, an adapter each on the reference UNet itself
    (the generator's on generator_init's UNet when set). Seeded: every trainer rank builds the same networks."""
    torch.manual_seed(cfg.run.seed)
    lora_spec = cfg.model.lora
    if cfg.model.generator_init is None:
        gen_unet = parts.unet if lora_spec else copy.deepcopy(parts.unet)
    else:  # a pipeline or UNet folder, or a bare state dict (DMD2's), always in the reference's architecture
        from distar.models.checkpoints import initial_unet

        init = sources.resolve(cfg.model.generator_init, cfg.model.family, cache_dir(), "model.generator_init", files="unet")
        gen_unet = initial_unet(init, parts.unet, "model.generator_init")
    if lora_spec:
        trainable = lambda unet: checkpointed(cfg, lora.with_adapter(unet, lora_spec))  # noqa: E731 -- float32 adapters on a frozen base
    else:
        trainable = lambda unet: checkpointed(cfg, unet.float().requires_grad_(True))  # noqa: E731 -- float32 masters
    generator = OneStepGenerator(trainable(gen_unet), parts.schedule, cfg.model.t_star, dtype_of(cfg))
    fake = Denoiser(trainable(parts.unet if lora_spec else copy.deepcopy(parts.unet)), parts.schedule, dtype_of(cfg))
    return generator, fake
