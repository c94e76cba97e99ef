"""Build the shapes world's models, with fixed seeds, and write them in the ecosystem's formats.

    python jobs/build_toy_assets.py [--out DIR] [--quick]

Writes, under DIR (default: the package's shipped assets, platform/distar/toy/assets):
  reader/      the attribute reader that judges generated images
  clip/        mini-CLIP (transformers CLIPModel; the clip_score reward)
  pickscore/   mini-PickScore (mini-CLIP fine-tuned on rater comparisons; the pickscore reward)
  reference/   the miniature Stable Diffusion (diffusers StableDiffusionPipeline folder)
  report.json  every figure measured on held-out samples, and samples.png, a grid of the reference
--quick trains each part for a few steps only: it checks the build, not the models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distar.images import grid, save_png  # noqa: E402
from distar.toy import assets, autoencoder, diffusion, judge, world  # noqa: E402
from distar.toy import clip as toy_clip  # noqa: E402
from distar.toy import reader as toy_reader  # noqa: E402

FULL = dict(images=100_000, pairs=40_000, held_out=2_000, reader_steps=2_000, vae_steps=1_200, clip_steps=1_200,
            pickscore_steps=600, unet_steps=1_600, eval_prompts=200, eval_steps=50)
QUICK = dict(images=512, pairs=256, held_out=64, reader_steps=4, vae_steps=4, clip_steps=4,
             pickscore_steps=4, unet_steps=4, eval_prompts=8, eval_steps=2)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=assets.ASSETS)
    p.add_argument("--quick", action="store_true", help="a few steps per part: checks the build, not the models")
    args = p.parse_args(argv)
    cfg, out, report = (QUICK if args.quick else FULL), args.out, {}
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    log(f"rendering {cfg['images']} world images and {cfg['held_out']} held-out ones")
    images, attrs = world.sample(cfg["images"], seed=SEED)
    x, prompts = toy_reader.to_tensor(images), [a.prompt for a in attrs]
    held_images, held_attrs = world.sample(cfg["held_out"], seed=SEED + 10_000)
    held_x, held_prompts = toy_reader.to_tensor(held_images), [a.prompt for a in held_attrs]
    del images

    log("reader")
    reader = toy_reader.fit(x, attrs, cfg["reader_steps"], seed=SEED, log=log)
    reader.save(assets.path("reader", out))
    reading = reader.read(held_x)
    true_pref = np.array([a.pref for a in held_attrs])
    report["reader"] = {"accuracy": reading.accuracy(held_prompts), "pref_mae": float(np.abs(reading.pref - true_pref).mean()),
                        "pref_corr": float(np.corrcoef(reading.pref, true_pref)[0, 1]), "held_out": cfg["held_out"]}
    log(f"reader on held-out world images: {report['reader']}")

    for downsample in (4, 2):  # 1/4 unless the VAE loses attributes, then 1/2
        log(f"vae at 1/{downsample} resolution")
        vae = autoencoder.fit(x, downsample, cfg["vae_steps"], seed=SEED, log=log)
        recon = reader.read(autoencoder.reconstruct(vae, held_x))
        agreement = {k: float(np.mean(np.array(getattr(recon, k)) == np.array(getattr(reading, k)))) for k in toy_reader.CATEGORIES}
        report["vae"] = {"downsample": downsample, "reader_agreement_with_originals": agreement,
                         "accuracy_on_reconstructions": recon.accuracy(held_prompts), "scaling_factor": vae.config.scaling_factor}
        log(f"vae: {report['vae']}")
        if min(agreement.values()) >= 0.95 or args.quick:
            break

    log("mini-CLIP")
    clip, tok = toy_clip.fit_clip(x, prompts, cfg["clip_steps"], seed=SEED, log=log)
    toy_clip.save(clip, tok, assets.path("clip_score", out))
    log("mini-PickScore")
    pickscore = toy_clip.fit_pickscore(clip, tok, toy_clip.rater_pairs(cfg["pairs"], seed=SEED + 20_000), cfg["pickscore_steps"], seed=SEED, log=log)
    toy_clip.save(pickscore, tok, assets.path("pickscore", out))
    report["rewards"] = reward_report(out, held_x, held_prompts, true_pref)
    log(f"rewards: {report['rewards']}")

    log("miniature Stable Diffusion UNet")
    encoder = text_encoder_of(clip)
    table = world.all_prompts()
    embeddings = prompt_embeddings(encoder, tok, table + [""])
    index = {p: i for i, p in enumerate(table)}
    latents = autoencoder.encode(vae, x)
    unet = diffusion.fit(latents, torch.tensor([index[p] for p in prompts]), embeddings, cfg["unet_steps"], seed=SEED, log=log)
    save_pipeline(out, vae, encoder, tok, unet)

    log("judging the reference")
    report["reference"] = judge_reference(out, cfg)
    log(f"reference: {report['reference']}")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    log(f"done: {out}")
    return 0


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


def judge_reference(out: Path, cfg: dict) -> dict:
    """The reference's N-step CFG samples on held-out prompts, read back by the reader."""
    folder, reader = assets.path("reference", out), toy_reader.Reader.load(assets.path("reader", out))
    prompts, result, best = judge.held_out_prompts(cfg["eval_prompts"]), {}, None
    for scale in EVAL_CFG:
        verdict, images = judge.judge(folder, prompts, reader, cfg["eval_steps"], scale)
        result[f"cfg_{scale}"] = verdict.row()
        if best is None or verdict.accuracy["all"] > result[f"cfg_{best}"]["all"]:
            best, best_images = scale, images
    save_png(grid(best_images[:100], columns=10), out / "samples.png", scale=4)
    return {"steps": cfg["eval_steps"], "prompts": cfg["eval_prompts"], "best_cfg": best, **result}


if __name__ == "__main__":
    sys.exit(main())
