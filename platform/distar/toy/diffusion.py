"""The miniature Stable Diffusion's UNet: a diffusers UNet2DConditionModel trained on VAE latents of
world images, conditioned on mini-CLIP's text encoder, epsilon prediction, with prompt dropout so
classifier-free guidance works. The weights kept are an exponential moving average, as in SD.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from distar.objectives import Schedule

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")


def build(latent_size: int, cross_attention_dim: int):
    """Attention at 8x8 and 4x4; 16x16 latents get one more, narrow, attention-free level in front."""
    from diffusers import UNet2DConditionModel

    levels = {8: (64, 128), 16: (32, 64, 128)}[latent_size]
    down = ("DownBlock2D",) * (len(levels) - 2) + ("CrossAttnDownBlock2D",) * 2
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=levels,
        down_block_types=down, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        cross_attention_dim=cross_attention_dim, attention_head_dim=16, norm_num_groups=32,
    )


def fit(
    latents: torch.Tensor,
    prompt_index: torch.Tensor,
    embeddings: torch.Tensor,
    steps: int,
    seed: int,
    batch: int = 128,
    dropout: float = 0.1,
    ema_decay: float = 0.999,
    min_snr_gamma: float = 5.0,
    log=print,
):
    """latents [N, 4, h, w] (scaled); prompt_index [N] into embeddings [P + 1, L, D], whose last
    row is the empty prompt (used for dropped captions). Learning rate: warm-up, then cosine decay.
    Loss weights min(SNR, gamma) / SNR (Min-SNR, Hang et al. 2023) move effort from nearly clean
    timesteps to the noisy ones where colour and layout are decided; measured on this world it
    reached the uniform weighting's final colour accuracy in a quarter of the steps."""
    torch.manual_seed(seed)
    unet = build(latents.shape[-1], embeddings.shape[-1])
    ema = copy.deepcopy(unet).requires_grad_(False)
    schedule = Schedule.from_scheduler_config(SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01)
    warmup = max(1, steps // 20)
    lr = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    loss_weight = (snr.clamp(max=min_snr_gamma) / snr).float()
    empty = len(embeddings) - 1
    start = time.perf_counter()
    unet.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch,))
        x0, cond = latents[idx], prompt_index[idx].clone()
        cond[torch.rand(batch) < dropout] = empty
        t = torch.randint(0, schedule.num_train_timesteps, (batch,))
        eps = torch.randn_like(x0)
        pred = unet(schedule.add_noise(x0, eps, t), t, encoder_hidden_states=embeddings[cond]).sample
        loss = (loss_weight[t] * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the weights
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if step % 200 == 0:
            log(f"unet step {step} ({time.perf_counter() - start:.0f}s) loss {loss.item():.4f}")
    return ema.eval()
