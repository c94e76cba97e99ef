"""Image helpers shared by jobs and tracking: tensors to uint8, grids, PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def grid(images: Tensor, columns: int) -> np.ndarray:
    """Row-major grid of the first (N // columns) * columns images, uint8 [rows*H, columns*W, 3]."""
    x = to_uint8(images)
    columns = min(columns, len(x))
    n = len(x) - len(x) % columns
    rows = x[:n].reshape(n // columns, columns, *x.shape[1:]).transpose(0, 2, 1, 3, 4)
    return rows.reshape(rows.shape[0] * rows.shape[1], -1, 3)


def save_png(pixels: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """uint8 [H, W, 3] to a PNG, enlarged `scale` times with nearest-neighbour (pixels stay visible)."""
    from PIL import Image

    image = Image.fromarray(pixels)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return Path(path)
