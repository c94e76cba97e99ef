"""LAION aesthetic predictor v2: an MLP on CLIP ViT-L/14's L2-normalised image embedding that
rates an image on AVA's 1-10 scale. The prompt plays no part.

Folder format:
- a transformers CLIP folder: `config.json` and weights of a CLIPModel (as
  `openai/clip-vit-large-patch14` ships; its text tower is dropped after loading) or of a
  CLIPVisionModelWithProjection, plus `preprocessor_config.json` (without it: the model's image
  size and OpenAI CLIP's normalisation);
- the head: `aesthetic_head.safetensors` (the MLP's state dict, keys `layers.{0,2,4,6,7}.*`) or,
  failing that, the original state dict as the folder's only `.pth` file (such as
  `sac+logos+ava1-l14-linearMSE.pth`), read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distar.errors import UserError
from distar.rewards.preprocess import Preprocess, read_preprocessing

HEAD_FILE = "aesthetic_head.safetensors"


class AestheticHead(nn.Module):
    """L2 normalisation, then the predictor's MLP layer for layer, so the released state dicts load
    unchanged. The MLP has no activations: the released heads were trained as a stack of linear
    layers. Dropout is identity in eval mode and only keeps the indices."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        # In the head's precision, which can exceed the CLIP's (a half-precision CLIP, a float32 head).
        embeds = F.normalize(embeds.to(self.layers[0].weight.dtype), dim=-1)
        return self.layers(embeds).squeeze(-1)


def load_head(folder: Path, embed_dim: int) -> AestheticHead:
    path = folder / HEAD_FILE
    if path.is_file():
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        candidates = sorted(folder.glob("*.pth"))
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise UserError(f"{folder}: no aesthetic head: expected {HEAD_FILE} or exactly one .pth state dict (found .pth: {found})")
        state = torch.load(candidates[0], map_location="cpu", weights_only=True)
    head = AestheticHead(embed_dim)
    head.load_state_dict(state)
    return head


class AestheticReward(nn.Module):
    """head(projection(vision(pixels))): the predictor's rating, unclamped."""

    def __init__(self, vision: nn.Module, projection: nn.Linear, head: AestheticHead, preprocess: Preprocess):
        super().__init__()
        self.vision, self.projection, self.head, self.preprocess = vision, projection, head, preprocess
        self.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, folder: Path) -> AestheticReward:
        from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

        # Both classes hold the same two parts under the same names; the image embedding is
        # visual_projection(vision_model(pixels).pooler_output) in each.
        is_full_clip = AutoConfig.from_pretrained(folder).model_type == "clip"
        model = (CLIPModel if is_full_clip else CLIPVisionModelWithProjection).from_pretrained(folder)
        vision, projection = model.vision_model, model.visual_projection
        preprocess = Preprocess(*read_preprocessing(folder, vision.config.image_size))
        return cls(vision, projection, load_head(folder, projection.out_features), preprocess)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(images).to(self.projection.weight.dtype)
        return self.head(self.projection(self.vision(pixel_values=pixels).pooler_output))
