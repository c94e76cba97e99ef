"""HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences; score = 100 * cos(image, text).

open_clip 3.x (`pip install open-clip-torch`) builds the model; transformers has no such architecture.
The learnt logit scale plays no part in the score.

Folder format (as the `xswu/HPSv2` hub repository ships):
- the checkpoint `HPS_v2.1_compressed.pt` or, failing that, the folder's only `.pt` file: an
  open_clip state dict, bare or under "state_dict", read with `torch.load(weights_only=True)`;
- optionally `open_clip_config.json` (open_clip's own format, `{"model_cfg": ...,
  "preprocess_cfg": ...}`) for an architecture other than the built-in ViT-H-14.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from distar.errors import UserError
from distar.rewards.preprocess import Preprocess

CHECKPOINT = "HPS_v2.1_compressed.pt"
ARCHITECTURE = "ViT-H-14"


def find_checkpoint(folder: Path) -> Path:
    if (folder / CHECKPOINT).is_file():
        return folder / CHECKPOINT
    candidates = sorted(folder.glob("*.pt"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise UserError(f"{folder}: no HPS checkpoint: expected {CHECKPOINT} or exactly one .pt file (found .pt: {found})")
    return candidates[0]


class HpsReward(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, preprocess: Preprocess):
        super().__init__()
        self.model, self.tokenizer, self.preprocess = model.requires_grad_(False).eval(), tokenizer, preprocess

    @classmethod
    def from_pretrained(cls, folder: Path) -> HpsReward:
        import open_clip

        checkpoint = find_checkpoint(folder)
        name = f"local-dir:{folder}" if (folder / "open_clip_config.json").is_file() else ARCHITECTURE
        model = open_clip.create_model(name, load_weights=False)
        open_clip.load_checkpoint(model, str(checkpoint), weights_only=True)  # no pickle: tensors only
        cfg = open_clip.get_model_preprocess_cfg(model)
        # The torch preprocessing below is open_clip's eval transform for resize_mode "shortest".
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise UserError(f"{folder}: resize_mode {cfg['resize_mode']!r} is not supported (only 'shortest')")
        h, w = (cfg["size"],) * 2 if isinstance(cfg["size"], int) else cfg["size"]
        if h != w:
            raise UserError(f"{folder}: non-square image size {h}x{w} is not supported")
        return cls(model, open_clip.get_tokenizer(name), Preprocess(h, cfg["mean"], cfg["std"]))

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        image = self.model.encode_image(self.preprocess(images).to(dtype))
        text = self.model.encode_text(self.tokenizer(prompts).to(images.device))
        return 100.0 * F.cosine_similarity(image.float(), text.float(), dim=-1)
