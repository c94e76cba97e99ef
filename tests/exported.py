"""What runs exported, as tests compare them: a run folder's generator UNet, weight by weight."""

import torch


def exported_unet(out) -> dict[str, torch.Tensor]:
    """The state dict of the UNet exported under run folder `out` (its generator/ pipeline folder)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(out / "generator" / "unet").state_dict()


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
