"""The shapes world's models built with fixed seeds and written in the ecosystem's formats: the
recipe behind `python jobs/build_toy_assets.py [--out DIR] [--quick]`.

Writes, under DIR (default: the package's shipped assets, platform/distar/toy/assets):
  reader/      the attribute reader that judges generated images
  clip/        mini-CLIP (transformers CLIPModel; the clip_score reward)
  pickscore/   mini-PickScore (mini-CLIP fine-tuned on rater comparisons; the pickscore reward)
  reference/   the miniature Stable Diffusion (diffusers StableDiffusionPipeline folder)
  report.json  every figure measured on held-out samples, and samples.png, a grid of the reference
QUICK trains each part for a few steps only: it checks the build, not the models.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distar.data import HELD_OUT_SEED
from distar.images import grid, save_png
from distar.toy import assets, autoencoder, diffusion, world
from distar.toy import clip as toy_clip
from distar.toy import reader as toy_reader


@dataclass(frozen=True)
class Settings:
    images: int  # world images the models train on
    pairs: int  # rater comparisons mini-PickScore trains on
    held_out: int  # world images the report measures on
    reader_steps: int
    vae_steps: int
    clip_steps: int
    pickscore_steps: int
    unet_steps: int
    eval_prompts: int  # held-out prompts the reference is judged on
    eval_steps: int  # its DDIM steps there
    quick: bool = False  # one VAE attempt, whatever it loses


FULL = Settings(images=100_000, pairs=40_000, held_out=2_000, reader_steps=2_000, vae_steps=1_200, clip_steps=1_200,
                pickscore_steps=600, unet_steps=1_600, eval_prompts=200, eval_steps=50)
QUICK = Settings(images=512, pairs=256, held_out=64, reader_steps=4, vae_steps=4, clip_steps=4,
                 pickscore_steps=4, unet_steps=4, eval_prompts=8, eval_steps=2, quick=True)
EVAL_CFG = (2.0, 3.0, 4.5)  # guidance scales the reference is judged at; the best is reported
SEED = 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def text_encoder_of(clip):
    """mini-CLIP's text tower as the CLIPTextModel the pipeline loads (SD uses CLIP's text encoder)."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())  # transformers 5 flattened text_model into the class
    return encoder.eval()


@torch.no_grad()
def prompt_embeddings(encoder, tok, prompts: list[str]) -> torch.Tensor:
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return encoder(ids).last_hidden_state


@dataclass
class Samples:
    """World images to train on and held-out ones to measure on."""

    x: torch.Tensor
    prompts: list[str]
    attrs: list
    held_x: torch.Tensor
    held_prompts: list[str]
    held_pref: np.ndarray


def build(out: Path = assets.ASSETS, settings: Settings = FULL, log: Callable[[str], None] = log) -> dict:
    """Train every model in order (each seeded; a second build gives the same weights), write it
    under `out` with report.json, and return the report."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log(f"rendering {settings.images} world images and {settings.held_out} held-out ones")
    images, attrs = world.sample(settings.images, seed=SEED)
    held_images, held_attrs = world.sample(settings.held_out, seed=SEED + 10_000)
    data = Samples(toy_reader.to_tensor(images), [a.prompt for a in attrs], attrs, toy_reader.to_tensor(held_images),
                   [a.prompt for a in held_attrs], np.array([a.pref for a in held_attrs]))
    del images
    report = {}
    reader, reading, report["reader"] = build_reader(out, data, settings, log)
    vae, report["vae"] = build_vae(data, reader, reading, settings, log)
    clip, tok = build_rewards(out, data, settings, log)
    report["rewards"] = reward_report(out, data.held_x, data.held_prompts, data.held_pref)
    log(f"rewards: {report['rewards']}")
    build_reference(out, data, vae, clip, tok, settings, log)
    log("judging the reference")
    report["reference"] = judge_reference(out, settings)
    log(f"reference: {report['reference']}")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"done: {out}")
    return report


def build_reader(out: Path, data: Samples, settings: Settings, log) -> tuple[toy_reader.Reader, toy_reader.Reading, dict]:
    log("reader")
    reader = toy_reader.fit(data.x, data.attrs, settings.reader_steps, seed=SEED, log=log)
    reader.save(assets.path("reader", out))
    reading = reader.read(data.held_x)
    measured = {"accuracy": reading.accuracy(data.held_prompts), "pref_mae": float(np.abs(reading.pref - data.held_pref).mean()),
                "pref_corr": float(np.corrcoef(reading.pref, data.held_pref)[0, 1]), "held_out": settings.held_out}
    log(f"reader on held-out world images: {measured}")
    return reader, reading, measured


def build_vae(data: Samples, reader: toy_reader.Reader, reading: toy_reader.Reading, settings: Settings, log):
    """A VAE at 1/4 resolution, unless its reconstructions lose attributes the reader sees
    (`reading`: the reader on the originals): then 1/2."""
    for downsample in (4, 2):
        log(f"vae at 1/{downsample} resolution")
        vae = autoencoder.fit(data.x, downsample, settings.vae_steps, seed=SEED, log=log)
        recon = reader.read(autoencoder.reconstruct(vae, data.held_x))
        agreement = {k: float(np.mean(np.array(getattr(recon, k)) == np.array(getattr(reading, k)))) for k in toy_reader.CATEGORIES}
        measured = {"downsample": downsample, "reader_agreement_with_originals": agreement,
                    "accuracy_on_reconstructions": recon.accuracy(data.held_prompts), "scaling_factor": vae.config.scaling_factor}
        log(f"vae: {measured}")
        if min(agreement.values()) >= 0.95 or settings.quick:
            break
    return vae, measured


def build_rewards(out: Path, data: Samples, settings: Settings, log):
    """mini-CLIP (clip_score) and mini-PickScore (mini-CLIP fine-tuned on rater comparisons)."""
    log("mini-CLIP")
    clip, tok = toy_clip.fit_clip(data.x, data.prompts, settings.clip_steps, seed=SEED, log=log)
    toy_clip.save(clip, tok, assets.path("clip_score", out))
    log("mini-PickScore")
    pickscore = toy_clip.fit_pickscore(clip, tok, toy_clip.rater_pairs(settings.pairs, seed=SEED + 20_000), settings.pickscore_steps, seed=SEED, log=log)
    toy_clip.save(pickscore, tok, assets.path("pickscore", out))
    return clip, tok


def build_reference(out: Path, data: Samples, vae, clip, tok, settings: Settings, log) -> None:
    """The miniature Stable Diffusion: a UNet on the VAE's latents, conditioned by mini-CLIP's text tower."""
    log("miniature Stable Diffusion UNet")
    encoder = text_encoder_of(clip)
    table = world.all_prompts()
    embeddings = prompt_embeddings(encoder, tok, table + [""])
    index = {p: i for i, p in enumerate(table)}
    latents = autoencoder.encode(vae, data.x)
    unet = diffusion.fit(latents, torch.tensor([index[p] for p in data.prompts]), embeddings, settings.unet_steps, seed=SEED, log=log)
    save_pipeline(out, vae, encoder, tok, unet)


def reward_report(out: Path, held_x: torch.Tensor, held_prompts: list[str], true_pref: np.ndarray) -> dict:
    """How the rewards relate to the world: CLIP score separates right from wrong prompts,
    PickScore tracks the raters' hidden pref."""
    from distar.rewards import load_reward

    shuffled = [held_prompts[(i + 1) % len(held_prompts)] for i in range(len(held_prompts))]
    result = {}
    with torch.no_grad():
        for name in ("clip_score", "pickscore"):
            reward = load_reward(name, assets.path(name, out))
            right, wrong = reward(held_x, held_prompts).numpy(), reward(held_x, shuffled).numpy()
            result[name] = {"right_prompt_wins": float(np.mean(right > wrong)), "corr_with_pref": float(np.corrcoef(right, true_pref)[0, 1])}
    return result


def save_pipeline(out: Path, vae, encoder, tok, unet) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    scheduler = DDPMScheduler(**diffusion.SCHEDULER, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(assets.path("reference", out))  # half the size; loads back as float32


def judge_reference(out: Path, settings: Settings) -> dict:
    """The reference's N-step CFG samples on held-out prompts, read back by the reader, at each
    guidance scale of EVAL_CFG; the best scale's samples go to samples.png."""
    from distar.evaluation.judges import Judges
    from distar.evaluation.measure import measure_model
    from distar.models.sampling import Sampler

    folder, judges = assets.path("reference", out), Judges(reader=toy_reader.Reader.load(assets.path("reader", out)))
    prompts, result, best = world.held_out_prompts(settings.eval_prompts, HELD_OUT_SEED), {}, None
    for scale in EVAL_CFG:
        model = Sampler(folder, settings.eval_steps, scale, world.SIZE)
        result[f"cfg_{scale}"], images = measure_model(model, prompts, HELD_OUT_SEED, judges, diversity_prompts=0)
        if best is None or result[f"cfg_{scale}"]["acc/all"] > result[f"cfg_{best}"]["acc/all"]:
            best, best_images = scale, images
    save_png(grid(best_images[:100], columns=10), out / "samples.png", scale=4)
    return {"steps": settings.eval_steps, "prompts": settings.eval_prompts, "best_cfg": best, **result}
