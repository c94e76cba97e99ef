"""Image preprocessing for reward models, done in torch so the gradient reaches the images.

The models were trained on PIL pipelines (shorter side resized bicubic, centre crop, normalise);
these are the same steps as differentiable tensor operations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# OpenAI CLIP's normalisation: CLIP, open_clip's OpenAI-style models and BLIP all use it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_preprocessing(folder: Path, image_size: int) -> tuple[int, tuple, tuple]:
    """Crop size, mean and std from a transformers `preprocessor_config.json`; the model's own
    image size and CLIP's normalisation when the folder carries none."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return image_size, CLIP_MEAN, CLIP_STD
    cfg = json.loads(path.read_text())
    crop = cfg.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    return int(crop), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Shorter side to `size` (bicubic, antialiased), then the central size x size crop."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    if (h, w) != (size, size):
        images = F.interpolate(images, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True, align_corners=False)
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


class Preprocess(nn.Module):
    """Images [B, 3, H, W] in [0, 1], any size -> the normalised size x size pixels a vision tower takes."""

    def __init__(self, size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (resize_center_crop(images, self.size) - self.mean) / self.std
