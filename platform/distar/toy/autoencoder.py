"""The miniature Stable Diffusion's VAE: a diffusers AutoencoderKL from 32x32x3 to 8x8x4 latents
(1/4 resolution, as SD's VAE is 1/8), or 16x16x4 when 1/4 loses attributes.

Trained like SD's: reconstruction plus a small KL term; the latent scaling factor is set so
scaled latents have unit variance, as SD's 0.18215 does for its VAE. The reconstruction error is
weighted by chroma: the background is grey (its clutter noise is the same on all channels, and
no 8x8 latent can carry it), so without the weight the shape, a few percent of the pixels,
would get a few percent of the capacity.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def build(downsample: int):
    """downsample 4 -> 8x8 latents (three encoder blocks), 2 -> 16x16 (two)."""
    from diffusers import AutoencoderKL

    blocks = {4: (16, 32, 64), 2: (32, 64)}[downsample]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=blocks, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
    )


def fit(images: torch.Tensor, downsample: int, steps: int, seed: int, batch: int = 64, kl_weight: float = 1e-6,
        chroma_weight: float = 5.0, log=print):
    """Train on images float [N, 3, 32, 32] in [0, 1]; learning rate on a cosine decay."""
    torch.manual_seed(seed)
    vae = build(downsample)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x_all = images * 2 - 1
    start = time.perf_counter()
    vae.train()
    for step in range(1, steps + 1):
        x = x_all[torch.randint(0, len(x_all), (batch,))]
        # 0 on the grey background; dilated so colour bleeding past the shape's edge costs too
        chroma = F.max_pool2d((x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2, 5, stride=1, padding=2)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = ((1 + chroma_weight * chroma) * (recon - x) ** 2).mean() + kl_weight * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            log(f"vae step {step} ({time.perf_counter() - start:.0f}s) mse {F.mse_loss(recon, x).item():.5f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.mean for i in range(0, min(len(x_all), 4096), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images in [0, 1] through encoder mean and decoder, back in [0, 1]."""
    out = [vae.decode(vae.encode(images[i : i + batch] * 2 - 1).latent_dist.mean).sample for i in range(0, len(images), batch)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latents (what the UNet is trained on) of images in [0, 1]."""
    out = [vae.encode(images[i : i + batch] * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out) * vae.config.scaling_factor
