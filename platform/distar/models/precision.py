"""Mixed precision as distar runs it: float32 master weights, forwards in the run's dtype, math in float32.

- Trainable networks (generator, fake score) keep float32 weights, gradients and Adam states; their
  forwards run under torch.autocast in `model.dtype`. A learning rate of 1e-6 moves a float32
  weight of order 0.1; in bf16 (8 bits of mantissa) the same step rounds away.
- Frozen networks (reference UNet, VAE, text encoders, reward models) are held in `model.dtype`.
- Every network output is cast to float32 before the schedule and objectives.py see it: the score
  difference divides by b_t^2 and subtracts two nearly equal predictions.
- Requests and results cross processes as those float32 tensors (latents are small next to UNets).

float16 is refused: without loss scaling its backward underflows, and bf16 runs on every GPU
generation that trains models of this size.
"""

from __future__ import annotations

import contextlib

import torch

from distar.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def autocast(dtype: torch.dtype, device: torch.device | str):
    """Forwards in `dtype` on `device` (autocast keeps reductions and norms where they are safe);
    a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    # Without its cache: a region runs one UNet, whose weights are each cast once, so the cache saves
    # no cast, but it would keep every trainable weight's copy to the region's end, through gradient
    # checkpointing (a UNet's worth in bf16: 0.49 GiB on SD1.5).
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def check_device(dtype: torch.dtype, device: torch.device | str) -> None:
    """Refuse a dtype the device cannot compute in, before any model loads on it."""
    device = torch.device(device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UserError(f"model.dtype: bfloat16 cannot run on {name} (no bf16 support; Ampere or newer has it); use float32")
