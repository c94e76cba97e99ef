"""Sampling pipeline folders with the stock diffusers pipeline classes.

A one-step generator folder (it carries `distar.json`) is sampled in one step at its t*; a
diffusion model (a reference) with N DDIM steps and classifier-free guidance. Every image has
its own noise seed, so an image does not depend on the batch it was generated in: the same
(prompt, seed) gives the same image from jobs/generate.py, evaluation and the Serve endpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from distar.errors import UserError
from distar.models.sources import PIPELINE_COMPONENTS


class _StartsAtTStar(logging.Filter):
    """LCM's scheduler warns at every call that a schedule starting at t* < T-1 is unusual: for a
    one-step generator it is the point. Other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The first timestep on the custom timestep schedule")


_QUIET_LCM = _StartsAtTStar()


def one_step_timestep(folder: str | Path) -> int | None:
    marker = Path(folder) / "distar.json"
    return json.loads(marker.read_text())["one_step_timestep"] if marker.is_file() else None


def load_pipeline(folder: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import DDIMScheduler, DiffusionPipeline

    if not (Path(folder) / "model_index.json").is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    # Components a fetch leaves out (a reference's safety checker, feature extractor) load as None.
    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {name: None for name in index if not name.startswith("_") and name not in PIPELINE_COMPONENTS}
    try:  # safetensors only: a pickled .bin planted in a folder is never unpickled
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, **absent)
    except OSError as e:  # diffusers' word for a missing or unreadable file
        raise UserError(f"{folder}: cannot load the pipeline ({str(e).splitlines()[0][:300]})") from None
    if one_step_timestep(folder) is None:  # a diffusion model: sample with DDIM
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    else:
        logging.getLogger("diffusers.schedulers.scheduling_lcm").addFilter(_QUIET_LCM)  # once: the same filter object
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Sampler:
    """A pipeline folder (a one-step generator or a diffusion model) loaded once and sampled by
    (prompt, seed) pairs: what jobs/generate.py, evaluation, the registered pyfunc model and the
    Serve endpoint all generate with.

    `steps` and `cfg` apply to diffusion models only; a one-step generator takes its one step at
    t* without guidance (DI* trains the guidance in)."""

    def __init__(self, folder: str | Path, steps: int = 50, cfg: float = 3.0, resolution: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.folder, self.steps, self.cfg = Path(folder), steps, cfg
        self.pipe = load_pipeline(self.folder, dtype).to(device)
        self.t_star = one_step_timestep(self.folder)
        self.resolution = resolution or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def network_calls(self) -> int:
        """UNet evaluations per image."""
        return 1 if self.t_star is not None else self.steps * (2 if self.cfg > 1 else 1)

    def noise(self, seeds: Sequence[int]) -> Tensor:
        side = self.resolution // self.pipe.vae_scale_factor
        shape = (self.pipe.unet.config.in_channels, side, side)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], batch: int = 64) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] on the CPU, image i from noise seed seeds[i]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if self.t_star is not None:
            kwargs = dict(num_inference_steps=1, timesteps=[self.t_star], guidance_scale=1.0)
        else:
            kwargs = dict(num_inference_steps=self.steps, guidance_scale=self.cfg)
        noise = self.noise(seeds).to(self.pipe.device, self.pipe.unet.dtype)
        out = []
        for i in range(0, len(prompts), batch):
            images = self.pipe(list(prompts[i : i + batch]), latents=noise[i : i + batch], height=self.resolution, width=self.resolution,
                               output_type="pt", **kwargs).images
            out.append(images.float().cpu())
        return torch.cat(out)
