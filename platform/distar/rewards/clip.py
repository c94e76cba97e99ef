"""CLIP-architecture rewards: PickScore (a CLIP fine-tuned on human choices) and CLIP score.

Both load a transformers CLIPModel folder with its tokenizer and, when present, the image
preprocessing config (resize, crop, mean/std) it was trained with. Where the weights are
published without them (PickScore_v1 takes its processor from laion/CLIP-ViT-H-14-laion2B-s32B-b79K),
both come from a processor folder of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from distar.errors import UserError
from distar.rewards import MissingProcessorError
from distar.rewards.preprocess import Preprocess, read_preprocessing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class ClipReward(nn.Module):
    """pickscore: exp(logit_scale) * cos(image, text), as PickScore ranks images.
    clip_score: 100 * cos(image, text), unclamped so its gradient never vanishes."""

    def __init__(self, model, tokenizer, kind: Literal["pickscore", "clip_score"], preprocess: Preprocess):
        super().__init__()
        self.model, self.tokenizer, self.kind = model.requires_grad_(False).eval(), tokenizer, kind
        self.preprocess = preprocess

    @classmethod
    def from_pretrained(cls, folder: Path, kind: Literal["pickscore", "clip_score"], processor: Path | None = None) -> ClipReward:
        """The model from `folder`; tokenizer and preprocessing config from `processor` if given, else from `folder`."""
        from transformers import AutoTokenizer, CLIPModel

        source = Path(processor or folder)
        if not any((source / name).is_file() for name in TOKENIZER_FILES):
            # Without this, AutoTokenizer fails on the hub id it makes of the path, offline or not.
            if processor is None:
                raise MissingProcessorError(folder)
            raise UserError(f"{source}: the processor folder has no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
        model = CLIPModel.from_pretrained(folder)
        size, mean, std = read_preprocessing(source, model.config.vision_config.image_size)
        return cls(model, AutoTokenizer.from_pretrained(source), kind, Preprocess(size, mean, std))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(images)
        image = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)).pooler_output
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt").to(images.device)
        text = self.model.get_text_features(**tokens).pooler_output
        cos = F.cosine_similarity(image.float(), text.float(), dim=-1)
        scale = self.model.logit_scale.exp() if self.kind == "pickscore" else 100.0
        return scale * cos
