"""LoRA (model.lora): the generator and the fake score as adapters on one frozen base UNet.

A trainer rank holds the base once, frozen, in model.dtype. The generator's and the fake score's
UNets are two module trees over the base's very parameters (`shared_copy`), each with its own peft
LoRA adapter (diffusers' `add_adapter`) in float32. Only the adapters train, so only they have
gradients and Adam states; in one process the reference worker calls the bare base itself.

An adapter starts at zero (peft's default: B = 0), so the generator starts as its base. Exported,
it is both the merged UNet (base + adapter: what the stock pipeline loads) and the adapter alone as
pytorch_lora_weights.safetensors, which `pipe.load_lora_weights(folder)` puts on the base.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from distar.config import ConfigError, LoraSpec

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a pipeline's LoRA weights


def shared_copy(unet: nn.Module) -> nn.Module:
    """A module tree of its own (adapters go into it alone) over the same parameter tensors."""
    return copy.deepcopy(unet, memo={id(p): p for p in unet.parameters()})


def check_targets(unet: nn.Module, targets: list[str]) -> None:
    """Each target names at least one Linear or Conv2d of the UNet, as peft matches them: the
    module's name, or its last dotted parts."""
    layers = [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in layers):
            examples = sorted({name.rsplit(".", 1)[-1] for name in layers})[:12]
            raise ConfigError(f"model.lora.target_modules: {target!r} names no Linear or Conv2d module of the UNet "
                              f"(its layers end in names such as {', '.join(examples)})")


def config(spec: LoraSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, target_modules=list(spec.target_modules))


def with_adapter(base: nn.Module, spec: LoraSpec) -> nn.Module:
    """A shared copy of the frozen `base` with a fresh float32 adapter, the only trainable part."""
    check_targets(base, spec.target_modules)
    unet = shared_copy(base.requires_grad_(False))
    unet.add_adapter(config(spec))
    for p in unet.parameters():
        if p.requires_grad:  # the adapter's: float32 masters whatever the base's dtype
            p.data = p.data.float()
    return unet


def has_adapter(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def merged(unet: nn.Module) -> nn.Module:
    """A plain float32 UNet whose weights are the base's plus the adapter's update (a copy: the
    training networks keep their adapter)."""
    out = copy.deepcopy(unet).float()
    out.fuse_lora()
    out.unload_lora()
    return out


def save_adapter(unet: nn.Module, folder: Path) -> None:
    """The adapter as pytorch_lora_weights.safetensors in the LoRA format of the pipeline `folder`
    holds, with its peft config (rank, alpha, targets) in the file's metadata, so that
    load_lora_weights rebuilds it exactly."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline = getattr(diffusers, json.loads((Path(folder) / "model_index.json").read_text())["_class_name"])
    layers = {k: v.detach().to(torch.float32) for k, v in get_peft_model_state_dict(unet).items()}
    pipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=WEIGHTS_NAME,
                               unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
