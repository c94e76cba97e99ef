"""Model families end to end on tiny random pipelines: each family's folder is built from configs,
saved, loaded through `load_parts`, and run through one generator step, one reference step with
CFG and one reward call; its exported generator samples in one step with the stock pipeline."""

import copy

import pytest
import torch

from distar.config import ObjectiveSection, RunConfig
from distar.errors import UserError
from distar.models import tiny
from distar.models.diffusion import Denoiser, OneStepGenerator, export_generator, load_parts
from distar.objectives import guided
from distar.rewards import load_reward
from distar.roles.reference_worker import ReferenceRequest, ReferenceWorker
from distar.roles.reward_worker import RewardRequest, RewardWorker
from distar.roles.trainer import divergence_spec
from distar.run.in_process import run_loop

PROMPTS = ["a small red circle on the left", "a large blue square on the right"]
BUILDERS = {"sd15": tiny.build_sd15_pipeline, "sdxl": tiny.build_sdxl_pipeline}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: make(root / name) for name, make in BUILDERS.items()}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, folders):
    return request.param, load_parts(folders[request.param], 1000, family=request.param, resolution=tiny.RESOLUTION)


def generate(parts, prompts=PROMPTS, seed=0):
    generator = OneStepGenerator(copy.deepcopy(parts.unet), parts.schedule, t_star=399)
    z = torch.randn(len(prompts), *parts.latent_shape(tiny.RESOLUTION), generator=torch.Generator().manual_seed(seed))
    return generator, z, generator(z, parts.conditioner(prompts))


def test_generator_step(family):
    _, parts = family
    generator, z, x0 = generate(parts)
    assert x0.shape == z.shape and torch.isfinite(x0).all()
    x0.square().mean().backward()
    assert all(p.grad is not None for p in generator.unet.parameters() if p.requires_grad)


def test_reference_step_with_cfg_inside(family):
    _, parts = family
    _, z, x0 = generate(parts)
    x0 = x0.detach()
    t = torch.tensor([300, 600])
    x_t = parts.schedule.add_noise(x0, torch.randn_like(x0), t)
    reference = Denoiser(parts.unet, parts.schedule)
    spec = divergence_spec(ObjectiveSection(cfg_scale=3.0, cfg_placement="inside"))
    result = ReferenceWorker(reference, parts.conditioner)(ReferenceRequest(x_t, t, PROMPTS, x0, x0 + 0.1, spec))

    assert torch.isfinite(result.d_ref).all() and torch.isfinite(result.g_ref).all()
    assert result.g_ref.shape == x_t.shape and result.g_ref.abs().sum() > 0
    with torch.no_grad():  # the pool's batched, expanded unconditional input is the empty prompt's conditioning
        d_cond = reference(x_t, t, parts.conditioner(PROMPTS))
        d_uncond = reference(x_t, t, parts.conditioner([""] * len(PROMPTS)))
    torch.testing.assert_close(result.d_ref, guided(d_cond, d_uncond, 3.0), rtol=1e-4, atol=1e-5)


def test_reward_call(family, tiny_clip):
    _, parts = family
    _, _, x0 = generate(parts)
    result = RewardWorker(parts.decode, {"pickscore": load_reward("pickscore", tiny_clip)})(RewardRequest(x0.detach(), PROMPTS))
    assert result.rewards["pickscore"].shape == (len(PROMPTS),) and torch.isfinite(result.rewards["pickscore"]).all()
    grad = result.grads["pickscore"]
    assert grad.shape == x0.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_exported_generator_samples_in_one_step_with_the_stock_pipeline(family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name, parts = family
    generator, z, x0 = generate(parts)
    folder = export_generator(generator, parts.folder, tmp_path / "generator")
    pipe = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[name].from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        PROMPTS, num_inference_steps=1, timesteps=[399], guidance_scale=1.0, latents=z, output_type="latent",
        height=tiny.RESOLUTION, width=tiny.RESOLUTION,
    ).images
    torch.testing.assert_close(latents, x0.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_conditioning_is_the_stock_pipelines(tmp_path, force_zeros):
    from diffusers import StableDiffusionXLPipeline

    folder = tiny.build_sdxl_pipeline(tmp_path / "sdxl", force_zeros_for_empty_prompt=force_zeros)
    parts = load_parts(folder, 1000, family="sdxl", resolution=64)
    cond = parts.conditioner(PROMPTS + [""])
    hidden, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
    encoders = parts.conditioner.text_encoder, parts.conditioner.text_encoder_2
    assert hidden.shape == (3, tiny.MAX_TOKENS, sum(e.config.hidden_size for e in encoders))
    assert added["text_embeds"].shape == (3, encoders[1].config.projection_dim)
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 3  # original size, crop top-left, target size
    empty_is_zero = hidden[2].abs().max() == 0 and added["text_embeds"][2].abs().max() == 0
    assert empty_is_zero == force_zeros

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    torch.testing.assert_close(hidden[:2], embeds)
    torch.testing.assert_close(added["text_embeds"][:2], pooled)
    torch.testing.assert_close(hidden[2:].expand(2, -1, -1), negative)  # DI*'s unconditional = the stock negative
    torch.testing.assert_close(added["text_embeds"][2:].expand(2, -1), negative_pooled)

    native = load_parts(folder, 1000, family="sdxl")  # no resolution: the UNet's native size, as the stock pipeline
    assert native.conditioner([""])["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]


def test_family_must_fit_the_folder(folders):
    with pytest.raises(UserError, match="model.family: 'sd15' does not fit .*StableDiffusionXLPipeline"):
        load_parts(folders["sdxl"], 1000, family="sd15")
    with pytest.raises(UserError, match="model.family: 'sdxl' does not fit .*StableDiffusionPipeline"):
        load_parts(folders["sd15"], 1000, family="sdxl")


def test_in_process_run_takes_an_sdxl_step():
    """`model.family: sdxl` with tiny-random sources: the runner builds the tiny SDXL pipeline and trains."""
    cfg = RunConfig.model_validate({
        "model": {"family": "sdxl", "reference": "tiny-random"}, "objective": {"cfg_scale": 3.0},
        "rewards": [{"name": "pickscore", "source": "tiny-random"}], "data": {"prompts": "tiny-random", "batch_size": 2},
    })
    run = run_loop(cfg)
    assert run.parts.folder.name == "tiny-random-sdxl"
    metrics = run.trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()) and "divergence" in metrics
