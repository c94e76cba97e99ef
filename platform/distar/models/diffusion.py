"""Stable-Diffusion-family parts as DI* uses them: conditioning, denoisers, the one-step generator.

A diffusers pipeline folder (`model_index.json` with unet, vae, text_encoder, tokenizer,
scheduler) loads into `DiffusionParts`; the generator exports back into such a folder whose
scheduler takes exactly one step at t*, so the stock pipeline class samples it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distar.objectives import Schedule, one_step_x0

Cond = dict[str, Tensor]  # keyword arguments of the UNet call that carry the conditioning


def cat_cond(*conds: Cond) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class TextConditioner(nn.Module):
    """Prompts -> UNet conditioning (SD1.5 family: the CLIP text encoder's last hidden state)."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Cond:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}


class Denoiser(nn.Module):
    """A UNet read through its schedule as the x0-prediction D(x_t, t, c)."""

    def __init__(self, unet: nn.Module, schedule: Schedule):
        super().__init__()
        self.unet, self.schedule = unet, schedule

    def output(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.unet(x_t, t, **cond).sample

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.schedule.to_x0(self.output(x_t, t, cond), x_t, t)

    def eps(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.schedule.to_eps(self.output(x_t, t, cond), x_t, t)


class OneStepGenerator(nn.Module):
    """g_theta(z, c): z ~ N(0, I) read as x_{t*}, one UNet call to x0."""

    def __init__(self, unet: nn.Module, schedule: Schedule, t_star: int):
        super().__init__()
        self.unet, self.schedule, self.t_star = unet, schedule, t_star

    def forward(self, z: Tensor, cond: Cond) -> Tensor:
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.long)
        return one_step_x0(self.unet(z, t, **cond).sample, z, t, self.schedule)


@dataclass
class DiffusionParts:
    folder: Path
    unet: nn.Module
    vae: nn.Module
    conditioner: TextConditioner
    schedule: Schedule

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], differentiable."""
        return ((self.vae.decode(latents / self.latent_scale).sample + 1) / 2).clamp(0, 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"model.resolution: {resolution} is not a multiple of the VAE's factor {factor}")
        return (self.unet.config.in_channels, resolution // factor, resolution // factor)


def load_parts(folder: str | Path, num_train_timesteps: int, dtype: torch.dtype = torch.float32) -> DiffusionParts:
    """Load a diffusers SD-family folder component by component (only what DI* uses)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    schedule = Schedule.from_scheduler_config(scheduler_config)
    if schedule.num_train_timesteps != num_train_timesteps:
        raise ValueError(f"model.num_train_timesteps: config says {num_train_timesteps}, the reference's scheduler has {schedule.num_train_timesteps}")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).requires_grad_(False).eval()
    conditioner = TextConditioner(
        AutoTokenizer.from_pretrained(folder / "tokenizer"),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
    )
    return DiffusionParts(folder, unet, vae, conditioner, schedule)


def export_generator(generator: OneStepGenerator, reference_folder: Path, out: str | Path) -> Path:
    """Write the generator as a full pipeline folder: the reference's VAE and text encoder, the
    generator's UNet, and an LCM scheduler (as DMD2 ships) that with `timesteps=[t*]` takes one
    step from t* to x0. `distar.json` records t* for tools that sample it."""
    from diffusers import LCMScheduler

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")  # never leave a half-written folder under the final name
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(reference_folder, tmp, ignore=shutil.ignore_patterns("unet", "scheduler"))
    generator.unet.save_pretrained(tmp / "unet")
    scheduler_config = json.loads((reference_folder / "scheduler" / "scheduler_config.json").read_text())
    keep = {k: scheduler_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type") if k in scheduler_config}
    # A huge timestep_scaling makes LCM's boundary weight c_skip ~ 1e-12: its step is the x0-prediction.
    LCMScheduler(**keep, timestep_scaling=1e5, clip_sample=False, steps_offset=1).save_pretrained(tmp / "scheduler")
    index = json.loads((tmp / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "distar.json").write_text(json.dumps({"one_step_timestep": generator.t_star}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
