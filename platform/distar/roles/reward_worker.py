"""Reward worker: latents in, per-model rewards and their gradients with respect to the latents out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from distar.rewards import RewardModel


@dataclass
class RewardRequest:
    x0: Tensor  # detached latents [B, C, h, w]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def merge(cls, requests: list[RewardRequest]) -> RewardRequest:
        return cls(torch.cat([r.x0 for r in requests]), [p for r in requests for p in r.prompts])


@dataclass
class RewardResult:
    rewards: dict[str, Tensor]  # name -> [B] scores
    grads: dict[str, Tensor]  # name -> d r_k / d x0, shaped like x0

    def split(self, sizes: list[int]) -> list[RewardResult]:
        rewards = {k: v.split(sizes) for k, v in self.rewards.items()}
        grads = {k: v.split(sizes) for k, v in self.grads.items()}
        return [RewardResult({k: v[i] for k, v in rewards.items()}, {k: v[i] for k, v in grads.items()}) for i in range(len(sizes))]


class RewardWorker:
    """Decodes detached latents with the VAE, scores them with each reward model and
    back-propagates each score to the latents. Weights are the trainer's business."""

    def __init__(self, decode: Callable[[Tensor], Tensor], models: Mapping[str, RewardModel]):
        self.decode, self.models = decode, dict(models)

    def __call__(self, request: RewardRequest) -> RewardResult:
        x = request.x0.detach().requires_grad_()
        rewards, grads = {}, {}
        with torch.enable_grad():
            images = self.decode(x)  # decoded once, shared by every model's backward
            names = list(self.models)
            for i, name in enumerate(names):
                score = self.models[name](images, request.prompts)
                (grads[name],) = torch.autograd.grad(score.sum(), x, retain_graph=i < len(names) - 1)
                rewards[name] = score.detach().float()  # results cross processes in float32
        return RewardResult(rewards, grads)
