"""Requests and results cross processes through the object store as CPU tensors in float32 (the
networks' outputs, cast up for the math: distar.models.precision); each side moves them to its own device."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

T = TypeVar("T")


def moved(value: T, device: torch.device | str) -> T:
    """A copy of a role's request or result (dataclass, dict, tuple, list or tensor) with every
    tensor on device, detached: no autograd graph crosses a process."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: moved(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init})
    return value


def local_device() -> torch.device:
    """The GPU Ray gave this replica, if any (Ray sets CUDA_VISIBLE_DEVICES per actor)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
