"""Feature networks for distribution metrics on real images: a vision model no run optimises,
loaded through transformers from a folder or hub id; images in [0, 1] in, one vector each out.

    dinov2   Dinov2Model, its CLS token at 224 px (FD_DINOv2: Stein et al. 2023 found this space
             tracks human judgement of realism better than Inception's)
    clip     CLIPVisionModelWithProjection, its image embedding at the model's size (FD_CLIP:
             Kynkaanniemi et al. 2023). Not the CLIP a run trains on, or it is no held-out judge.

The kind is read from the folder's config. Inception, FID's original network, is not offered:
its maintained ports (torchvision, pytorch-fid, torch-fidelity, torchmetrics) all load it through
torchvision, whose PyPI build does not import against the CPU build of torch this project pins
("operator torchvision::nms does not exist"). Values from different feature networks, or from
different numbers of images, are not comparable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distar.errors import UserError

DINOV2_SIZE = 224
MEAN_STD = {  # the preprocessing each family was trained with
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


class Features:
    """`features(images)`: [N, 3, H, W] in [0, 1] -> [N, D] float32 on the CPU, in batches."""

    def __init__(self, model, kind: str, size: int, device: str = "cpu", batch: int = 32):
        self.model, self.kind, self.size, self.device, self.batch = model.to(device).eval(), kind, size, device, batch
        mean, std = MEAN_STD[kind]
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        out = []
        for i in range(0, len(images), self.batch):
            x = torch.nn.functional.interpolate(images[i : i + self.batch].float().cpu(), size=(self.size, self.size), mode="bicubic", antialias=True)
            x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.device)
            result = self.model(pixel_values=x)
            out.append((result.pooler_output if self.kind == "dinov2" else result.image_embeds).float().cpu())
        return torch.cat(out)


def load_features(source: str, device: str = "cpu", field: str = "--features") -> Features:
    """The feature network at `source` (a transformers folder or hub id of a DINOv2 or CLIP model)."""
    from transformers import CLIPVisionModelWithProjection, Dinov2Model

    config = feature_config(source, field)
    if config.model_type == "dinov2":
        return Features(Dinov2Model.from_pretrained(source), "dinov2", min(DINOV2_SIZE, config.image_size), device)
    vision = config
    if config.model_type == "clip":  # a whole CLIP model: its vision tower, with the model's projection width
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
    return Features(CLIPVisionModelWithProjection.from_pretrained(source, config=vision), "clip", vision.image_size, device)


def feature_config(source: str, field: str):
    """The transformers config at `source`, refused unless it is a DINOv2 or CLIP model's (reads no weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"{field}: {source}: not a transformers model folder or hub id ({str(e).splitlines()[0]})") from None
    if config.model_type not in ("dinov2", "clip", "clip_vision_model"):
        raise UserError(f"{field}: {source} holds a {config.model_type} model; distribution features come from a dinov2 or clip model")
    return config
