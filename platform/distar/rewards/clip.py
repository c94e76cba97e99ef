"""CLIP-architecture rewards: PickScore (a CLIP fine-tuned on human choices) and CLIP score.

Both load a transformers CLIPModel folder with its tokenizer and, when present, the image
preprocessing config (resize, crop, mean/std) it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# OpenAI CLIP's normalisation, used when a folder carries no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _preprocessing(folder: Path, image_size: int) -> tuple[int, tuple, tuple]:
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


class ClipReward(nn.Module):
    """pickscore: exp(logit_scale) * cos(image, text), as PickScore ranks images.
    clip_score: 100 * cos(image, text), unclamped so its gradient never vanishes."""

    def __init__(self, model, tokenizer, kind: Literal["pickscore", "clip_score"], size: int, mean: tuple, std: tuple):
        super().__init__()
        self.model, self.tokenizer, self.kind, self.size = model.requires_grad_(False).eval(), tokenizer, kind, size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, folder: Path, kind: Literal["pickscore", "clip_score"]) -> ClipReward:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(folder)
        size, mean, std = _preprocessing(folder, model.config.vision_config.image_size)
        return cls(model, AutoTokenizer.from_pretrained(folder), kind, size, mean, std)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = (resize_center_crop(images, self.size) - self.mean) / self.std
        image = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)).pooler_output
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt").to(images.device)
        text = self.model.get_text_features(**tokens).pooler_output
        cos = F.cosine_similarity(image.float(), text.float(), dim=-1)
        scale = self.model.logit_scale.exp() if self.kind == "pickscore" else 100.0
        return scale * cos
