"""Published architectures: Stable Diffusion 1.5 and XL, and the reward models' CLIPs, without a download.

The configs are those of runwayml/stable-diffusion-v1-5 (`unet/`, `vae/` and `text_encoder/`
config.json; its text encoder is CLIP ViT-L/14's text tower), written out here with diffusers'
and transformers' defaults left implicit. `build_sd15_random` saves them with random weights as
a diffusers pipeline folder, laid out like distar.models.tiny's folders so the same loaders read
it: real sizes (memory, step time) with meaningless numbers. Only the tokenizer is not SD1.5's:
the tiny word tokenizer, padded to SD1.5's 77 tokens, needs no hub download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distar.models import tiny
from distar.models.tokenizer import build_word_tokenizer

# UNet2DConditionModel, 859.5M parameters.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

# AutoencoderKL, 83.7M parameters; latents are 8x smaller than images, with 4 channels.
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)

# CLIPTextModel (ViT-L/14's text tower), 123.1M parameters; the vocabulary is CLIP's BPE size, of
# which the word tokenizer uses the first few hundred ids.
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)


def build_sd15_random(path: str | Path, seed: int = 0) -> Path:
    """A diffusers StableDiffusionPipeline folder with SD1.5's published architecture and random
    weights (about 4.3 GB in float32, as SD1.5 ships): the scheduler is tiny's, which has SD1.5's
    schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(tiny.WORDS, max_length=SD15_TEXT["max_position_embeddings"])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **ids)), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDPMScheduler(**tiny.SD_SCHEDULE, prediction_type="epsilon", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


# Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's `unet/`, `vae/`,
# `text_encoder/` and `text_encoder_2/` config.json). UNet2DConditionModel, 2567.5M parameters:
# both encoders' hidden states side by side (768 + 1280 = 2048) and an added embedding of the
# pooled bigG projection (1280) and 6 time ids of 256 each (2816).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)

# AutoencoderKL, SD1.5's architecture at 1024 px with its own latent scale: 83.7M parameters.
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}

# CLIPTextModel, CLIP ViT-L/14's text tower as in SD1.5 (123.1M), and CLIPTextModelWithProjection,
# OpenCLIP ViT-bigG/14's text tower with its projection (694.7M).
SDXL_TEXT = SD15_TEXT
SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)

# transformers CLIPModel configs of the reward models' CLIPs (text_config, vision_config, projection_dim).
# CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K; PickScore_v1 is its fine-tune): 986.1M parameters.
CLIP_VIT_H14 = dict(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=16, hidden_act="gelu"),
    projection_dim=1024,
)
# CLIP ViT-L/14 (openai/clip-vit-large-patch14; the LAION aesthetic predictor's CLIP): 427.6M parameters.
CLIP_VIT_L14 = dict(
    text_config=dict(SD15_TEXT, projection_dim=768),
    vision_config=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, hidden_act="quick_gelu"),
    projection_dim=768,
)
# Hub repositories whose CLIPModel architecture ships here, for plans of runs that name them.
HUB_CLIPS = {
    "yuvalkirstain/PickScore_v1": CLIP_VIT_H14,
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": CLIP_VIT_H14,
    "openai/clip-vit-large-patch14": CLIP_VIT_L14,
}
