"""The attribute reader: a small CNN, trained on world samples, that reads a generated image back
into (color, shape, size, position) and estimates its pref from saturation, blur and clutter.

Evaluation uses it as the toy world's judge: alignment is the reader's categories against the
prompt's, preference is its pref estimate. Saved as `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distar.toy import world

CATEGORIES = {
    "color": list(world.COLORS),
    "shape": list(world.SHAPES),
    "size": list(world.SIZES),
    "position": list(world.POSITIONS),
}
# Continuous attributes regressed on [0, 1] scales; pref is computed from them.
SCALES = {"saturation": world.SATURATION, "blur": world.BLUR, "clutter": world.CLUTTER}


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, 32, 32, 3] -> float [N, 3, 32, 32] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class Reading:
    color: list[str]
    shape: list[str]
    size: list[str]
    position: list[str]
    saturation: np.ndarray
    blur: np.ndarray
    clutter: np.ndarray

    @property
    def pref(self) -> np.ndarray:
        return world.pref_of(self.saturation, self.blur, self.clutter)

    def accuracy(self, prompts: list[str]) -> dict[str, float]:
        """Per-attribute agreement with the prompts, and `all` for every attribute at once."""
        truth = [world.parse_prompt(p) for p in prompts]
        hits = {k: np.array([getattr(self, k)[i] == t[j] for i, t in enumerate(truth)])
                for j, k in enumerate(("size", "color", "shape", "position"))}
        out = {k: float(v.mean()) for k, v in hits.items()}
        out["all"] = float(np.logical_and.reduce(list(hits.values())).mean())
        return out


class Reader(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 16x16
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 4x4: position survives the flatten
            nn.Flatten(), nn.Linear(16 * 4 * w, 256), nn.GELU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in CATEGORIES.items()})
        self.regress = nn.Linear(256, len(SCALES))
        self.width = width

    def forward(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        h = self.body(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}, self.regress(h)

    @torch.no_grad()
    def features(self, images: Tensor, batch: int = 512) -> Tensor:
        """images float [N, 3, 32, 32] in [0, 1] -> [N, 256]: what the heads read from, the
        features the distribution metrics compare (distar.evaluation.distribution)."""
        self.eval()
        return torch.cat([self.body(images[i : i + batch] * 2 - 1) for i in range(0, len(images), batch)])

    @torch.no_grad()
    def read(self, images: Tensor, batch: int = 512) -> Reading:
        """images float [N, 3, 32, 32] in [0, 1]."""
        self.eval()
        logits, values = zip(*(self(images[i : i + batch]) for i in range(0, len(images), batch)))
        cats = {k: [CATEGORIES[k][j] for j in torch.cat([out[k] for out in logits]).argmax(1).tolist()] for k in CATEGORIES}
        v = torch.cat(values).clamp(0, 1).numpy()
        cont = {k: lo + v[:, i] * (hi - lo) for i, (k, (lo, hi)) in enumerate(SCALES.items())}
        return Reading(**cats, **cont)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"width": self.width}))
        save_file(self.state_dict(), folder / "model.safetensors")

    @classmethod
    def load(cls, folder: str | Path) -> Reader:
        folder = Path(folder)
        reader = cls(**json.loads((folder / "config.json").read_text()))
        reader.load_state_dict(load_file(folder / "model.safetensors"))
        return reader.eval()


def targets(attrs: list[world.Attributes]) -> tuple[dict[str, Tensor], Tensor]:
    cats = {k: torch.tensor([v.index(getattr(a, k)) for a in attrs]) for k, v in CATEGORIES.items()}
    cont = torch.tensor([[(getattr(a, k) - lo) / (hi - lo) for k, (lo, hi) in SCALES.items()] for a in attrs])
    return cats, cont.float()


def footprints(attrs: list[world.Attributes]) -> Tensor:
    """Each image's shape footprint (world.footprint), float [N, 1, 32, 32]."""
    return torch.from_numpy(np.stack([world.footprint(a) for a in attrs])).float()[:, None]


def off_world_background(images: Tensor, footprints: Tensor, generator: torch.Generator, strength: float = 20 / 255) -> Tensor:
    """Tint the background and colour its clutter channel by channel, leaving the shape alone.

    Generators paint faintly coloured backgrounds that the world never shows; a reader trained only
    on grey ones reads a blue triangle on reddish clutter as red. Shown these, it learns to read
    the shape. footprints [N, 1, 32, 32] in [0, 1] (`footprints`)."""
    n = len(images)
    tint = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * strength
    clutter = torch.randn(n, 3, *images.shape[-2:], generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * strength
    return (images + (1 - footprints) * (tint + clutter)).clamp(0, 1)


def fit(images: Tensor, attrs: list[world.Attributes], steps: int, seed: int, log=print, batch: int = 256) -> Reader:
    """Train on world samples (images float [N, 3, 32, 32] in [0, 1]): cross-entropy per category
    plus regression of the continuous attributes. Half of each batch gets an off-world background
    and trains the categories only: pref is a property of the world's own grey clutter."""
    torch.manual_seed(seed)
    x, (cats, cont), n_train = images, targets(attrs), len(images)
    shapes = footprints(attrs)
    gen = torch.Generator().manual_seed(seed)
    reader = Reader()
    opt = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    reader.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,))
        clean, off = idx[: batch // 2], idx[batch // 2 :]
        logits, values = reader(torch.cat([x[clean], off_world_background(x[off], shapes[off], gen)]))
        loss = sum(F.cross_entropy(logits[k], cats[k][idx]) for k in CATEGORIES) + 10 * F.mse_loss(values[: len(clean)], cont[clean])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log(f"reader step {step + 1}/{steps} loss {loss.item():.4f}")
    return reader.eval()
