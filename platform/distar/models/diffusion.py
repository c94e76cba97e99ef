"""Stable-Diffusion-family parts as DI* uses them: conditioning, denoisers, the one-step generator.

A diffusers pipeline folder (`model_index.json` with unet, vae, text encoder(s), tokenizer(s),
scheduler) loads into `DiffusionParts`; the generator exports back into such a folder whose
scheduler takes exactly one step at t*, so the stock pipeline class samples it. Families differ
only in their conditioner: SD1.5 (and the toy) use one CLIP text encoder, SDXL two plus pooled
text embeddings and size/crop time ids.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distar.errors import UserError
from distar.models.precision import autocast
from distar.objectives import Schedule, one_step_x0

Family = Literal["toy", "sd15", "sdxl"]
# Keyword arguments of the UNet call that carry the conditioning, batch first in every tensor;
# nested for SDXL: {"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}.
Cond = dict[str, "Tensor | Cond"]


def _map_cond(fn: Callable[..., Tensor], *conds: Cond) -> Cond:
    """Apply fn leaf by leaf to conds of the same structure."""
    return {
        k: _map_cond(fn, *(c[k] for c in conds)) if isinstance(v, dict) else fn(*(c[k] for c in conds))
        for k, v in conds[0].items()
    }


def cat_cond(*conds: Cond) -> Cond:
    return _map_cond(lambda *leaves: torch.cat(leaves), *conds)


def expand_cond(cond: Cond, n: int) -> Cond:
    """A batch-1 Cond as a batch of n, without copying."""
    return _map_cond(lambda leaf: leaf.expand(n, *leaf.shape[1:]), cond)


def _token_ids(tokenizer: Any, prompts: list[str], device: torch.device) -> Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids.to(device)


class TextConditioner(nn.Module):
    """Prompts -> UNet conditioning (SD1.5 family: the CLIP text encoder's last hidden state). Frozen."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        ids = _token_ids(self.tokenizer, prompts, self.text_encoder.device)
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}


class SDXLConditioner(TextConditioner):
    """SDXL conditioning as StableDiffusionXLPipeline builds it: both encoders' penultimate hidden
    states side by side, text_encoder_2's projected pooled output as text_embeds, and time ids
    (original size, crop top-left, target size) for an uncropped image at `resolution`.

    With `zeros_for_empty` (the pipeline's force_zeros_for_empty_prompt) the empty prompt, DI*'s
    unconditional input, embeds as zeros: SDXL learned dropped captions that way, and the stock
    pipeline's unconditional branch uses zeros too."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, tokenizer_2: Any, text_encoder_2: nn.Module,
                 resolution: int, zeros_for_empty: bool):
        super().__init__(tokenizer, text_encoder)
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2.requires_grad_(False).eval()
        self.time_ids = (resolution, resolution, 0, 0, resolution, resolution)
        self.zeros_for_empty = zeros_for_empty

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        out = self.text_encoder(_token_ids(self.tokenizer, prompts, self.text_encoder.device), output_hidden_states=True)
        out_2 = self.text_encoder_2(_token_ids(self.tokenizer_2, prompts, self.text_encoder_2.device), output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds
        if self.zeros_for_empty:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden, pooled = hidden.masked_fill(empty.view(-1, 1, 1), 0), pooled.masked_fill(empty.view(-1, 1), 0)
        time_ids = torch.tensor([self.time_ids], dtype=hidden.dtype, device=hidden.device).expand(len(prompts), -1)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def unet_output(unet: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, dtype: torch.dtype) -> Tensor:
    """The UNet's raw output, computed in `dtype` (distar.models.precision), returned in float32."""
    with autocast(dtype, x_t.device):
        return unet(x_t, t, **cond).sample.float()


class Denoiser(nn.Module):
    """A UNet read through its schedule as the x0-prediction D(x_t, t, c); `dtype` is the compute dtype."""

    def __init__(self, unet: nn.Module, schedule: Schedule, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.unet, self.schedule, self.dtype = unet, schedule, dtype

    def output(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return unet_output(self.unet, x_t, t, cond, self.dtype)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.schedule.to_x0(self.output(x_t, t, cond), x_t, t)

    def eps(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.schedule.to_eps(self.output(x_t, t, cond), x_t, t)


class OneStepGenerator(nn.Module):
    """g_theta(z, c): z ~ N(0, I) read as x_{t*}, one UNet call to x0."""

    def __init__(self, unet: nn.Module, schedule: Schedule, t_star: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.unet, self.schedule, self.t_star, self.dtype = unet, schedule, t_star, dtype

    def forward(self, z: Tensor, cond: Cond) -> Tensor:
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.long)
        return one_step_x0(unet_output(self.unet, z, t, cond, self.dtype), z, t, self.schedule)


@dataclass
class DiffusionParts:
    folder: Path
    unet: nn.Module
    vae: nn.Module
    conditioner: TextConditioner
    schedule: Schedule

    def decode(self, latents: Tensor) -> Tensor:
        return decode_latents(self.vae, latents)

    def to(self, device: torch.device | str) -> DiffusionParts:
        for module in (self.unet, self.vae, self.conditioner):
            module.to(device)
        return self

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = _vae_factor(self.vae)
        if resolution % factor:
            raise UserError(f"model.resolution: {resolution} is not a multiple of the VAE's factor {factor}")
        return (self.unet.config.in_channels, resolution // factor, resolution // factor)


def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Latents -> float32 images in [0, 1], differentiable; decoded in the VAE's own dtype."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    return ((images + 1) / 2).clamp(0, 1)


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pipeline's VAE alone: what a reward worker needs to decode latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(Path(folder), subfolder="vae", torch_dtype=dtype).requires_grad_(False).eval()


def _vae_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def check_pipeline_folder(folder: str | Path) -> Path:
    """The folder, if it has the two files every load starts from (a driver checks this before
    anything starts; a replica would only fail later, and again on every restart)."""
    folder = Path(folder)
    for needed in ("model_index.json", SCHEDULER_CONFIG):
        if not (folder / needed).is_file():
            raise UserError(f"{folder} is not a complete diffusers pipeline folder: it has no {needed}")
    return folder


def load_parts(
    folder: str | Path,
    num_train_timesteps: int,
    dtype: torch.dtype = torch.float32,
    family: Family = "sd15",
    resolution: int | None = None,
    unet_dtype: torch.dtype | None = None,
) -> DiffusionParts:
    """Load a diffusers SD-family folder component by component (only what DI* uses), in `dtype`
    (the UNet in `unet_dtype` if given: a trainer initialises float32 masters from it).

    `resolution` (pixels) is what SDXL's time ids announce; by default the UNet's native size,
    as the stock pipeline assumes. `family` picks the conditioner and must fit the folder."""
    from diffusers import UNet2DConditionModel

    folder = check_pipeline_folder(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if ("text_encoder_2" in index) != (family == "sdxl"):  # else the UNet fails later on a cryptic shape mismatch
        raise UserError(f"model.family: {family!r} does not fit {folder}, a {index.get('_class_name', 'pipeline')} folder")
    schedule = Schedule.from_scheduler_config(json.loads((folder / SCHEDULER_CONFIG).read_text()))
    if schedule.num_train_timesteps != num_train_timesteps:
        raise UserError(f"model.num_train_timesteps: config says {num_train_timesteps}, the reference's scheduler has {schedule.num_train_timesteps}")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=unet_dtype or dtype)
    vae = load_vae(folder, dtype)
    if resolution is None:
        resolution = unet.config.sample_size * _vae_factor(vae)
    conditioner = _load_conditioner(folder, index, family, dtype, resolution)
    return DiffusionParts(folder, unet, vae, conditioner, schedule)


def _load_conditioner(folder: Path, index: dict, family: Family, dtype: torch.dtype, resolution: int) -> TextConditioner:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    first = (AutoTokenizer.from_pretrained(folder / "tokenizer"), CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype))
    if family != "sdxl":
        return TextConditioner(*first)
    second = (AutoTokenizer.from_pretrained(folder / "tokenizer_2"), CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=dtype))
    # The pipeline's own default when model_index.json does not say.
    return SDXLConditioner(*first, *second, resolution, zeros_for_empty=index.get("force_zeros_for_empty_prompt", True))


def export_generator(generator: OneStepGenerator, reference_folder: Path, out: str | Path) -> Path:
    """Write the generator as a full pipeline folder: the reference's VAE and text encoders, the
    generator's UNet (merged with its LoRA adapter, which is also written alone: distar.models.lora),
    and an LCM scheduler (as DMD2 ships) that with `timesteps=[t*]` takes one step from t* to x0.
    `distar.json` records t* for tools that sample it. Only what that pipeline loads is copied
    (sources.needed): a reference's root checkpoints, variants, safety checker and README would
    otherwise ride along into every registered version."""
    from diffusers import LCMScheduler

    from distar.models import lora
    from distar.models.sources import PIPELINE_COMPONENTS, select

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")  # never leave a half-written folder under the final name
    shutil.rmtree(tmp, ignore_errors=True)
    names = [p.relative_to(reference_folder).as_posix() for p in sorted(reference_folder.rglob("*")) if p.is_file()]
    for name in select(names, "pipeline"):
        if name.split("/")[0] not in ("unet", "scheduler"):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reference_folder / name, tmp / name)  # the content, not a hub cache's symlink
    if lora.has_adapter(generator.unet):  # the merged UNet for the stock pipeline, and the adapter for load_lora_weights
        lora.merged(generator.unet).save_pretrained(tmp / "unet")
        lora.save_adapter(generator.unet, tmp)
    else:
        generator.unet.save_pretrained(tmp / "unet")
    scheduler_config = json.loads((reference_folder / "scheduler" / "scheduler_config.json").read_text())
    keep = {k: scheduler_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type") if k in scheduler_config}
    # A huge timestep_scaling makes LCM's boundary weight c_skip ~ 1e-12: its step is the x0-prediction.
    LCMScheduler(**keep, timestep_scaling=1e5, clip_sample=False, steps_offset=1).save_pretrained(tmp / "scheduler")
    index = json.loads((tmp / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    # Components not exported are declared absent, as the pipelines' own save_pretrained does.
    index.update({k: [None, None] for k, v in index.items() if isinstance(v, list) and len(v) == 2 and k not in PIPELINE_COMPONENTS})
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "distar.json").write_text(json.dumps({"one_step_timestep": generator.t_star}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
