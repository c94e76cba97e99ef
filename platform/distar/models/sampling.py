"""Sampling pipeline folders with the stock diffusers pipeline classes.

A one-step generator folder (it carries `distar.json`) is sampled in one step at its t*; a
diffusion model (a reference) with N DDIM steps and classifier-free guidance. Sample i uses
noise from seed + i, so an image does not depend on the batch it was generated in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor


def one_step_timestep(folder: str | Path) -> int | None:
    marker = Path(folder) / "distar.json"
    return json.loads(marker.read_text())["one_step_timestep"] if marker.is_file() else None


def load_pipeline(folder: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    if one_step_timestep(folder) is None:  # a diffusion model: sample with DDIM
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_noise(pipe, n: int, seed: int, resolution: int) -> Tensor:
    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


@torch.no_grad()
def generate(pipe, folder: str | Path, prompts: list[str], steps: int, cfg: float, seed: int, resolution: int, batch: int = 64) -> Tensor:
    """Images [N, 3, H, W] in [0, 1]. One-step folders ignore `steps` and `cfg`."""
    t_star = one_step_timestep(folder)
    noise = initial_noise(pipe, len(prompts), seed, resolution).to(pipe.unet.dtype)
    out = []
    for i in range(0, len(prompts), batch):
        kwargs = dict(num_inference_steps=1, timesteps=[t_star], guidance_scale=1.0) if t_star is not None else dict(num_inference_steps=steps, guidance_scale=cfg)
        images = pipe(prompts[i : i + batch], latents=noise[i : i + batch], height=resolution, width=resolution, output_type="pt", **kwargs).images
        out.append(images.float().cpu())
    return torch.cat(out)
