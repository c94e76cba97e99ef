"""UNet weights in the forms they are published in, loaded into the reference's architecture.

A one-step generator may start from a diffusers pipeline folder (its unet/), a UNet folder
(config.json and weights), or a bare state dict in one file, the way DMD2 publishes its UNets
(`dmd2_sdxl_1step_unet_fp16.bin`; SD1.5: `model/sdv1.5/<run>/pytorch_model.bin`). A bare state
dict carries no config: the architecture is always the reference UNet's, and the weights must
fit it exactly, key for key and shape for shape.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from distar.errors import UserError

SHOWN = 3  # keys named per kind of mismatch; the counts say how many there are


def initial_unet(source: Path, reference_unet: nn.Module, field: str) -> nn.Module:
    """A new UNet with `reference_unet`'s config and dtype and the weights of `source` (a resolved
    local path: a pipeline folder with unet/, a UNet folder with config.json, or a state-dict file
    `.safetensors`, `.bin` or `.pt`). Weights that do not fit raise a UserError naming `field`."""
    state = read_state_dict(source, field)
    check_fit(state, reference_unet.state_dict(), f"{field}: {source}")
    unet = copy.deepcopy(reference_unet)  # the reference's config and dtype without a random init
    unet.load_state_dict(state, strict=True)  # copies into unet's tensors, casting to its dtype
    return unet


def read_state_dict(source: Path, field: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, or of the UNet a folder holds. Never unpickles objects."""
    source = Path(source)
    if source.is_dir():
        from diffusers import UNet2DConditionModel

        folder = source / "unet" if (source / "unet").is_dir() else source
        if not (folder / "config.json").is_file():
            raise UserError(f"{field}: {source} holds no UNet (expected a pipeline folder with unet/, or a UNet folder with config.json)")
        # from_pretrained reads every weight format and layout diffusers knows (shards, old key names).
        return UNet2DConditionModel.from_pretrained(folder).state_dict()
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(source)
    if source.suffix not in (".bin", ".pt"):
        raise UserError(f"{field}: {source} is not a state-dict file (.safetensors, .bin or .pt)")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated file: the same fix for the user
        raise UserError(f"{field}: {source} is not a weights-only state dict ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{field}: {source} is not a state dict of tensors (got {type(state).__name__})")
    return state


def check_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """One line naming the first few missing and unexpected keys and shape mismatches, with counts."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: expected {tuple(v.shape)}, got {tuple(state[k].shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    parts = [f"{len(keys)} {what} ({'; '.join(keys[:SHOWN])}{'; ...' if len(keys) > SHOWN else ''})"
             for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    if parts:
        raise UserError(f"{where} does not fit the reference UNet ({len(expected)} tensors): {', '.join(parts)}")
