"""mini-CLIP and mini-PickScore: transformers CLIPModels trained on the shapes world.

mini-CLIP learns image/prompt agreement contrastively (the CLIP-score reward, and the text
encoder of the miniature Stable Diffusion). mini-PickScore is mini-CLIP fine-tuned on rater
comparisons (two images, one prompt) with the Bradley-Terry loss, as PickScore was trained on
Pick-a-Pic. Both see images through the same differentiable preprocessing the reward wrapper uses.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from distar.models.tokenizer import build_word_tokenizer
from distar.rewards.preprocess import Preprocess
from distar.toy import world

MAX_TOKENS = 16


def tokenizer():
    words = sorted({w for p in world.all_prompts() for w in p.split()})
    return build_word_tokenizer(words, max_length=MAX_TOKENS)


def build(tok):
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = dict(image_size=world.SIZE, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def save(model, tok, folder) -> None:
    from transformers import CLIPImageProcessorPil

    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": world.SIZE}, crop_size={"height": world.SIZE, "width": world.SIZE}).save_pretrained(folder)


def _features(model, tok, images: torch.Tensor, prompts: list[str], preprocess: Preprocess):
    image = model.get_image_features(pixel_values=preprocess(images)).pooler_output
    tokens = tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    text = model.get_text_features(**tokens).pooler_output
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def fit_clip(images: torch.Tensor, prompts: list[str], steps: int, seed: int, batch: int = 256, log=print):
    """Contrastive training; a batch holds repeated prompts (the world has 180), so every image
    whose prompt matches counts as a positive (soft targets), not only its own caption."""
    torch.manual_seed(seed)
    tok = tokenizer()
    model, preprocess = build(tok), Preprocess(world.SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    prompt_ids = np.array([hash(p) for p in prompts])
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch,))
        img, txt = _features(model, tok, images[idx], [prompts[i] for i in idx], preprocess)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = torch.from_numpy(prompt_ids[idx.numpy()][:, None] == prompt_ids[idx.numpy()][None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"clip step {step} ({time.perf_counter() - start:.0f}s) loss {loss.item():.4f}")
    return model.eval(), tok


def rater_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """n comparisons: two images of one prompt and whether the rater preferred the first."""
    from distar.toy.reader import to_tensor

    rng = np.random.default_rng(seed)
    prompts = [world.all_prompts()[i] for i in rng.integers(0, 180, n)]
    a, attrs_a = world.sample(n, seed=seed + 1, prompts=prompts)
    b, attrs_b = world.sample(n, seed=seed + 2, prompts=prompts)
    first = world.rater_prefers_first(np.array([x.pref for x in attrs_a]), np.array([x.pref for x in attrs_b]), rng)
    return to_tensor(a), to_tensor(b), prompts, torch.from_numpy(first)


def fit_pickscore(clip, tok, pairs, steps: int, seed: int, batch: int = 128, log=print):
    """Bradley-Terry on rater choices: P(A > B) = softmax over the two images' scores."""
    import copy

    torch.manual_seed(seed)
    model, preprocess = copy.deepcopy(clip).train(), Preprocess(world.SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    a, b, prompts, first = pairs
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(a), (batch,))
        p = [prompts[i] for i in idx]
        img_a, txt = _features(model, tok, a[idx], p, preprocess)
        img_b, _ = _features(model, tok, b[idx], p, preprocess)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * torch.stack([(img_a * txt).sum(-1), (img_b * txt).sum(-1)], dim=1)
        loss = F.cross_entropy(logits, (~first[idx]).long())  # class 0: the first image won
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"pickscore step {step} ({time.perf_counter() - start:.0f}s) loss {loss.item():.4f}")
    return model.eval()
