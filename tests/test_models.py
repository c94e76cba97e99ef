"""Loading diffusers folders, the one-step generator, its export, and the reward wrappers."""

import copy
import json

import pytest
import torch

from distar.errors import UserError
from distar.models import sources
from distar.models.diffusion import OneStepGenerator, cat_cond, expand_cond, export_generator, load_parts
from distar.models.tiny import build_sd15_pipeline
from distar.rewards import load_reward
from distar.rewards.preprocess import resize_center_crop


def test_exported_generator_samples_in_one_step_with_the_stock_pipeline(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    parts = load_parts(tiny_pipeline, 1000)
    generator = OneStepGenerator(copy.deepcopy(parts.unet), parts.schedule, t_star=399)
    folder = export_generator(generator, parts.folder, tmp_path / "generator")
    assert not (tmp_path / "generator.partial").exists()

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, *parts.latent_shape(32), generator=torch.Generator().manual_seed(0))
    prompts = ["a small red circle on the left", "a large blue square on the right"]
    latents = pipe(prompts, num_inference_steps=1, timesteps=[399], guidance_scale=1.0, latents=z, output_type="latent").images
    with torch.no_grad():
        ours = generator(z, parts.conditioner(prompts))
    torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-4)


def test_v_prediction_reference_loads_with_its_schedule(tmp_path):
    parts = load_parts(build_sd15_pipeline(tmp_path / "v", prediction_type="v_prediction"), 1000)
    assert parts.schedule.prediction_type == "v_prediction"
    with pytest.raises(UserError, match="model.num_train_timesteps"):
        load_parts(tmp_path / "v", 500)


def test_latent_shape_and_resolution(tiny_pipeline):
    parts = load_parts(tiny_pipeline, 1000)
    assert parts.latent_shape(32) == (4, 8, 8)
    with pytest.raises(UserError, match="model.resolution"):
        parts.latent_shape(30)


def test_sources(tmp_path, tiny_pipeline):
    assert sources.resolve(str(tiny_pipeline), "sd15", tmp_path, "model.reference") == tiny_pipeline
    built = sources.resolve("tiny-random", "pickscore", tmp_path, "rewards.0.source")
    assert (built / "config.json").is_file() and sources.resolve("tiny-random", "pickscore", tmp_path, "x") == built
    for bad in ("/no/such/folder", "./relative/missing", "not-a-hub-id"):
        with pytest.raises(sources.SourceError, match="model.reference"):
            sources.resolve(bad, "sd15", tmp_path, "model.reference")
    with pytest.raises(sources.SourceError, match="could not fetch"):  # HF_HUB_OFFLINE=1 in tests
        sources.resolve("someone/some-model", "sd15", tmp_path, "model.reference")


@pytest.mark.parametrize("kind, pipeline", [("toy", "StableDiffusionPipeline"), ("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")])
def test_tiny_random_builds_the_family_asked_for(tmp_path, kind, pipeline):
    folder = sources.resolve("tiny-random", kind, tmp_path, "model.reference")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == pipeline


def test_the_tiny_tokenizer_gives_every_process_the_same_ids():
    """BPE training breaks ties in a per-process hash order; the vocabulary is sorted after it, so
    tiny models built in two processes (a test and a Ray worker) read a prompt alike."""
    import subprocess
    import sys

    code = ("from distar.models import tiny; t = tiny._tokenizer(); "
            "print([t(w).input_ids for w in tiny.WORDS], t('a small red circle on the left').input_ids)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] and runs[0].startswith("[[")


def test_nested_conditioning_concatenates_and_expands_leaf_by_leaf():
    one = {"encoder_hidden_states": torch.randn(1, 4, 6), "added_cond_kwargs": {"text_embeds": torch.randn(1, 3), "time_ids": torch.randn(1, 6)}}
    many = expand_cond(one, 3)
    assert many["encoder_hidden_states"].shape == (3, 4, 6) and many["added_cond_kwargs"]["time_ids"].shape == (3, 6)
    assert torch.equal(many["added_cond_kwargs"]["text_embeds"][2], one["added_cond_kwargs"]["text_embeds"][0])
    both = cat_cond(one, many)
    assert both["added_cond_kwargs"]["text_embeds"].shape == (4, 3) and both["encoder_hidden_states"].shape == (4, 4, 6)
    assert torch.equal(both["added_cond_kwargs"]["time_ids"][1:], many["added_cond_kwargs"]["time_ids"])


@pytest.mark.parametrize("name", ["pickscore", "clip_score"])
def test_rewards_are_differentiable_in_the_images(tiny_clip, name):
    reward = load_reward(name, tiny_clip)
    images = torch.rand(3, 3, 48, 40, requires_grad=True)  # any size: resized in torch
    scores = reward(images, ["a red circle", "a blue square", ""])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())  # reward models stay frozen
    if name == "clip_score":
        assert scores.abs().max() <= 100  # 100 * cosine


def test_unknown_reward_is_refused(tiny_clip):
    with pytest.raises(UserError, match="unknown reward"):
        load_reward("nope", tiny_clip)


def test_resize_center_crop_keeps_the_middle():
    img = torch.zeros(1, 3, 20, 40)
    img[..., :, 10:30] = 1.0  # a bright centre band as wide as the crop
    out = resize_center_crop(img, 10)
    assert out.shape == (1, 3, 10, 10)
    assert out[..., :, 2:8].min() > 0.9
