"""Tiny random models in the ecosystem's own folder formats, for tests and smoke runs.

They are built from small configs with a fixed seed, saved with `save_pretrained`, and then
loaded through exactly the code that loads real SD1.5, SDXL or PickScore folders. Their numbers
mean nothing: they only exercise the machinery.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distar.models.tokenizer import build_word_tokenizer

WORDS = "a the on in of small large red yellow green cyan blue magenta circle square triangle left right top bottom center".split()
PROMPTS = [
    "a small red circle on the left",
    "a large blue square on the right",
    "a small green triangle on the top",
    "a large yellow circle in the center",
    "a small cyan square on the bottom",
    "a large magenta triangle on the left",
]
MAX_TOKENS = 16
RESOLUTION = 32  # pixels; the VAE downsamples by 4 to 8x8x4 latents


def _tokenizer():
    return build_word_tokenizer(WORDS, max_length=MAX_TOKENS)


def _text_config(tokenizer, hidden_size: int = 32, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _unet(**family):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        attention_head_dim=8, norm_num_groups=8, **family,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=4, scaling_factor=scaling_factor,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


# Both families' discrete schedule (scaled_linear betas); each pipeline keeps its own scheduler class.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def build_sd15_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A diffusers StableDiffusionPipeline folder with SD1.5's structure and tiny widths."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))
    unet = _unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def build_sdxl_pipeline(path: str | Path, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Path:
    """A diffusers StableDiffusionXLPipeline folder with SDXL's structure and tiny widths: a
    CLIPTextModel and a CLIPTextModelWithProjection of different widths (as ViT-L and bigG),
    and a UNet with text-time added conditioning sized to match them."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width, width_2, pooled, time_embed_dim = 32, 48, 24, 8
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer, hidden_size=width)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(tokenizer, hidden_size=width_2, projection_dim=pooled, hidden_act="gelu")))
    unet = _unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=width + width_2,  # both encoders' hidden states side by side
        # added embedding: text_encoder_2's pooled projection and 6 time ids, each embedded in time_embed_dim
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_embed_dim,
    )
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type="epsilon", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def build_clip(path: str | Path, seed: int = 0) -> Path:
    """A transformers CLIPModel folder (model, tokenizer, image preprocessing) as PickScore ships."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    model = CLIPModel(CLIPConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(image_size=RESOLUTION, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    ))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION}).save_pretrained(path)
    return Path(path)


def build_aesthetic(path: str | Path, seed: int = 0) -> Path:
    """A tiny CLIP folder plus a random LAION-style aesthetic head on its projection width."""
    from safetensors.torch import save_file

    from distar.rewards.aesthetic import HEAD_FILE, AestheticHead

    folder = build_clip(path, seed)
    torch.manual_seed(seed)
    save_file(AestheticHead(json.loads((folder / "config.json").read_text())["projection_dim"]).state_dict(), folder / HEAD_FILE)
    return folder
