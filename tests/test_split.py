"""Split equals monolithic: the generator gradient assembled from separate roles (reward worker,
reference worker, trainer) equals one autograd graph over every network, on tiny diffusers models
of both families (SD1.5's single text encoder, SDXL's nested conditioning), and with the generator
and the fake score as LoRA adapters on the reference UNet itself (model.lora)."""

import copy

import pytest
import torch

from distar.config import LoraSpec, ObjectiveSection, OptimSection, RewardSpec
from distar.models import lora, tiny
from distar.models.diffusion import Denoiser, OneStepGenerator, load_parts
from distar.rewards import load_reward
from distar.roles.reference_worker import ReferenceResult, ReferenceWorker
from distar.roles.reward_worker import RewardWorker
from distar.roles.trainer import Later, TrainerStep, frozen

PROMPTS = ["a small red circle on the left", "a large blue square on the right", ""]
REWARDS = [RewardSpec(name="pickscore", source="-", weight=0.7), RewardSpec(name="clip_score", source="-", weight=0.02)]
RTOL = 1e-5


def perturbed(module, scale, seed):
    """A copy with different weights, so generator, fake score and reference all disagree."""
    out = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out.requires_grad_(True)


def adapted(unet, seed):
    """A LoRA adapter on `unet` itself (its parameters shared, frozen), in float64 and random (a
    fresh one is zero), so generator, fake score and reference all disagree."""
    out = lora.with_adapter(unet, LoraSpec(rank=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in out.parameters() if p.requires_grad):
            p.data = 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64)
    return out


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd15+lora"])
def world(request, tmp_path_factory, tiny_clip):
    family, adapters = request.param.removesuffix("+lora"), request.param.endswith("+lora")
    folder = {"sd15": tiny.build_sd15_pipeline, "sdxl": tiny.build_sdxl_pipeline}[family](tmp_path_factory.mktemp(family) / family)
    parts = load_parts(folder, 1000, torch.float64, family, tiny.RESOLUTION)
    network = adapted if adapters else lambda unet, seed: perturbed(unet, 0.3, seed)
    generator = OneStepGenerator(network(parts.unet, 1), parts.schedule, t_star=399)
    fake = Denoiser(network(parts.unet, 2), parts.schedule)
    rewards = {r.name: load_reward(r.name, tiny_clip).double() for r in REWARDS}
    return parts, generator, fake, rewards


def monolithic_loss(parts, generator, fake, rewards, objective, d):
    """DESIGN.md section 1 written out in score units, every network in one graph."""
    cond = parts.conditioner(PROMPTS)
    x0 = generator(d.z, cond)
    images = parts.decode(x0)
    reward = sum(r.weight * rewards[r.name](images, PROMPTS) for r in REWARDS)
    loss = -reward
    if objective.alpha == 0:
        return loss.mean()
    a, b = parts.schedule.ab(d.t, x0)
    x_t = a * x0 + b * d.eps
    score = lambda D: (a * D - x_t) / b**2  # noqa: E731
    ref = Denoiser(parts.unet, parts.schedule)
    with frozen(fake), frozen(ref):
        s_fake = score(fake(x_t, d.t, cond))
        s_c = score(ref(x_t, d.t, cond))
        s_u = score(ref(x_t, d.t, parts.conditioner([""] * len(PROMPTS))))
    w = objective.cfg_scale
    s_ref = s_u + w * (s_c - s_u) if objective.cfg_placement == "inside" else s_c
    dot = lambda u, v: (u * v).flatten(1).sum(1)  # noqa: E731
    if objective.divergence == "score":
        y = s_fake - s_ref
        c = objective.huber_c
        dprime = y / (dot(y, y) + c**2).sqrt().view(-1, 1, 1, 1)
        div = -dot(dprime, s_fake - (a * x0 - x_t) / b**2)
    else:
        div = dot((s_fake - s_ref).detach(), x_t)
    if objective.cfg_placement == "outside":
        div = div + dot(-(w - 1) * (s_c - s_u).detach(), x_t)
    return (loss + objective.alpha * (b**2 / a).flatten() * div).mean()


def no_update(loss):
    raise AssertionError("these tests take gradients themselves")


def trainer_for(world, objective, query_reference=None):
    parts, generator, fake, rewards = world
    reference = ReferenceWorker(Denoiser(parts.unet, parts.schedule), parts.conditioner)
    worker = RewardWorker(parts.decode, rewards)
    return TrainerStep(
        generator, fake, parts.conditioner, parts.latent_shape(32), objective, REWARDS, OptimSection(),
        score_rewards=lambda request: Later(lambda: worker(request)), query_reference=lambda request: Later(lambda: (query_reference or reference)(request)),
        updates=(no_update, no_update),
    )


def gradient(loss, module):
    """The gradient with respect to the trained parameters (with adapters, not the frozen base's)."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad])])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("placement", ["inside", "outside", "none"])
@pytest.mark.parametrize("divergence", ["score", "kl"])
def test_split_gradient_equals_monolithic(world, divergence, placement):
    parts, generator, fake, rewards = world
    objective = ObjectiveSection(divergence=divergence, cfg_placement=placement, cfg_scale=3.0, huber_c=5.0, alpha=1.0)
    trainer = trainer_for(world, objective)
    d = trainer.draw(len(PROMPTS), torch.Generator().manual_seed(0))
    d.z, d.eps = d.z.double(), d.eps.double()

    split, metrics = trainer.generator_loss(trainer.sample(PROMPTS, d))
    g_split = gradient(split, generator)
    g_mono = gradient(monolithic_loss(parts, generator, fake, rewards, objective, d), generator)

    assert torch.isfinite(g_mono).all() and g_mono.norm() > 0
    assert relative_error(g_split, g_mono) < RTOL
    assert set(metrics) >= {"reward/pickscore", "reward/clip_score", "divergence", "loss/generator"}


def test_reward_only_objective_skips_the_reference(world):
    objective = ObjectiveSection(alpha=0.0)

    def no_reference(request):
        raise AssertionError("alpha = 0 must not query the reference")

    trainer = trainer_for(world, objective, query_reference=no_reference)
    d = trainer.draw(len(PROMPTS), torch.Generator().manual_seed(1))
    d.z, d.eps = d.z.double(), d.eps.double()
    parts, generator, fake, rewards = world
    split, _ = trainer.generator_loss(trainer.sample(PROMPTS, d))
    assert relative_error(gradient(split, generator), gradient(monolithic_loss(parts, generator, fake, rewards, objective, d), generator)) < RTOL


def test_pool_without_reference_backward_gives_a_different_gradient(world):
    """The shortcut of detaching the reference path is measurably wrong, not a rounding error."""
    parts, generator, _, _ = world
    objective = ObjectiveSection(divergence="score", cfg_placement="inside", cfg_scale=3.0, huber_c=5.0)
    reference = ReferenceWorker(Denoiser(parts.unet, parts.schedule), parts.conditioner)
    exact = trainer_for(world, objective)
    detached = trainer_for(world, objective, query_reference=lambda req: ReferenceResult(reference(req).d_ref, None))
    d = exact.draw(len(PROMPTS), torch.Generator().manual_seed(2))
    d.z, d.eps = d.z.double(), d.eps.double()
    g_exact = gradient(exact.generator_loss(exact.sample(PROMPTS, d))[0], generator)
    g_detached = gradient(detached.generator_loss(detached.sample(PROMPTS, d))[0], generator)
    assert relative_error(g_detached, g_exact) > 1e-3
