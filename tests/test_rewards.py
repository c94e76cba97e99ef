"""Reward wrappers beyond CLIP: the aesthetic predictor, built tiny and random, and the wrappers
whose architectures live in optional packages (HPSv2 on open_clip, ImageReward on BLIP)."""

import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distar.errors import UserError
from distar.models import tiny
from distar.rewards import MissingPackageError, load_reward
from distar.rewards.aesthetic import HEAD_FILE
from distar.rewards.preprocess import CLIP_MEAN, CLIP_STD

PROMPTS = ["a small red circle on the left", "a large blue square on the right", ""]


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    return tiny.build_aesthetic(tmp_path_factory.mktemp("models") / "aesthetic")


def images(n: int, size: int = tiny.RESOLUTION, seed: int = 0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_aesthetic_is_differentiable_in_the_images(tiny_aesthetic):
    reward = load_reward("aesthetic", tiny_aesthetic)
    x = torch.rand(3, 3, 48, 40, requires_grad=True)  # any size: resized in torch
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_aesthetic_is_the_head_on_normalised_clip_image_features(tiny_aesthetic):
    from transformers import CLIPModel

    x = images(3)  # already at the model's size, so preprocessing is normalisation only
    clip = CLIPModel.from_pretrained(tiny_aesthetic)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = F.normalize(clip.get_image_features(pixel_values=(x - mean) / std).pooler_output, dim=-1)
    state = load_file(tiny_aesthetic / HEAD_FILE)
    for i in (0, 2, 4, 6, 7):  # the linear layers, in order; dropout is off at eval
        h = F.linear(h, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
    with torch.no_grad():
        scores = load_reward("aesthetic", tiny_aesthetic)(x, PROMPTS)
    torch.testing.assert_close(scores, h.squeeze(-1), rtol=1e-5, atol=1e-5)


def test_aesthetic_scores_each_image_alone_and_ignores_the_prompt(tiny_aesthetic):
    reward = load_reward("aesthetic", tiny_aesthetic)
    x = images(3)
    with torch.no_grad():
        batch = reward(x, PROMPTS)
        singles = torch.cat([reward(x[i : i + 1], [PROMPTS[i]]) for i in range(3)])
        other_prompts = reward(x, ["", "something else", "a triangle"])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch, other_prompts)
    assert batch.std() > 0  # different images, different scores: the test can tell them apart


def test_aesthetic_loads_the_original_pth_head(tiny_aesthetic, tmp_path):
    folder = shutil.copytree(tiny_aesthetic, tmp_path / "pth")
    (folder / HEAD_FILE).unlink()
    torch.save(load_file(tiny_aesthetic / HEAD_FILE), folder / "sac+logos+ava1-l14-linearMSE.pth")
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(load_reward("aesthetic", folder)(x, PROMPTS[:2]), load_reward("aesthetic", tiny_aesthetic)(x, PROMPTS[:2]))


def test_aesthetic_loads_a_vision_only_clip(tiny_aesthetic, tmp_path):
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(tiny_aesthetic)
    config.vision_config.projection_dim = config.projection_dim
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_aesthetic, config=config.vision_config)
    folder = tmp_path / "vision"
    vision.save_pretrained(folder)
    for name in ("preprocessor_config.json", HEAD_FILE):
        shutil.copy(tiny_aesthetic / name, folder / name)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "clip_vision_model"
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(load_reward("aesthetic", folder)(x, PROMPTS[:2]), load_reward("aesthetic", tiny_aesthetic)(x, PROMPTS[:2]))


def test_aesthetic_without_a_head_says_what_it_expects(tiny_clip):
    with pytest.raises(UserError, match=HEAD_FILE):
        load_reward("aesthetic", tiny_clip)


@pytest.mark.parametrize(("name", "module", "package"), [("hpsv2", "open_clip", "open-clip-torch"), ("image_reward", "ImageReward", "image-reward")])
def test_missing_package_names_what_to_install(name, module, package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed, installed or not
    with pytest.raises(MissingPackageError, match=f"pip install {package} "):
        load_reward(name, tmp_path)


def test_hpsv2_is_100_cos_of_open_clip_features(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="open_clip (pip install open-clip-torch) is not installed; HPSv2 builds only through it")
    folder = tmp_path / "hps"
    folder.mkdir()
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": tiny.RESOLUTION, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False).eval()
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")

    reward = load_reward("hpsv2", folder)
    x = images(3).requires_grad_()
    scores = reward(x, PROMPTS)
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1), torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.encode_image((x - mean) / std, normalize=True)
        text = model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(PROMPTS), normalize=True)
    torch.testing.assert_close(scores.detach(), 100 * (image * text).sum(-1), rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_image_reward_checks_its_folder(tmp_path):
    # No tiny random ImageReward exists: its model class fixes BLIP at ViT-L and fetches
    # bert-base-uncased's tokenizer from the hub. The folder check runs before either.
    pytest.importorskip("ImageReward", reason="image-reward is not installed or does not import", exc_type=ImportError)
    with pytest.raises(UserError, match="ImageReward.pt"):
        load_reward("image_reward", tmp_path)
