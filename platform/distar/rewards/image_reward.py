"""ImageReward: BLIP (ViT-L image encoder, BERT text encoder cross-attending to the image) with an
MLP on the text's [CLS] feature, standardised by the mean and std ImageReward ships.

The `image-reward` package (`pip install image-reward`, imported as `ImageReward`) builds the
model; transformers has no such architecture. Its BLIP tokenizer is `bert-base-uncased`, which
that package fetches from the hub on first use (cached afterwards).

Folder format (as the `THUDM/ImageReward` hub repository ships): `ImageReward.pt` (state dict,
read with `torch.load(weights_only=True)`) and `med_config.json` (the text encoder's config).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distar.errors import UserError
from distar.rewards.preprocess import Preprocess

CHECKPOINT, MED_CONFIG = "ImageReward.pt", "med_config.json"
IMAGE_SIZE = 224  # fixed by ImageReward's BLIP
MAX_TOKENS = 35  # ImageReward's prompt length
SCORING_PARTS = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


class BlipReward(nn.Module):
    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model, self.preprocess = model.requires_grad_(False).eval(), preprocess

    @classmethod
    def from_pretrained(cls, folder: Path) -> BlipReward:
        from ImageReward.ImageReward import ImageReward

        missing = [name for name in (CHECKPOINT, MED_CONFIG) if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder}: not an ImageReward folder: missing {', '.join(missing)}")
        model = ImageReward(med_config=str(folder / MED_CONFIG))
        state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
        # Non-strict as ImageReward's own loader is (the checkpoint has keys the scorer never uses),
        # but every weight the score depends on must be there.
        absent = [k for k in model.load_state_dict(state, strict=False).missing_keys if k.startswith(SCORING_PARTS)]
        if absent:
            raise UserError(f"{folder / CHECKPOINT}: not an ImageReward checkpoint: {len(absent)} scoring weights missing, e.g. {absent[0]}")
        return cls(model, Preprocess(IMAGE_SIZE))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        # ImageReward.score's computation on tensors. Its score_gard is not used: it builds the
        # attention mask on the device given at construction, not the one the model is on.
        blip = self.model.blip
        tokens = blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(images.device)
        image_embeds = blip.visual_encoder(self.preprocess(images).to(next(blip.parameters()).dtype))
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = blip.text_encoder(
            tokens.input_ids, attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, return_dict=True,
        )
        reward = self.model.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1)
        return (reward - self.model.mean) / self.model.std
