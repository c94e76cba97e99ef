"""Mixed precision (distar.models.precision): forwards in bf16 over float32 master weights, the
math in float32, in one process and through the Ray runtime's DeepSpeed engines (their CPU twin:
gloo in this process). Gradient checkpointing recomputes activations without changing a gradient."""

import pytest
import torch
import torch.nn.functional as F

from distar.config import ConfigError, load_config
from distar.models.diffusion import decode_latents, load_parts
from distar.run import build
from distar.run.in_process import InProcess
from distar.run.loop import RunLoop

SMOKE = "jobs/configs/smoke.yaml"
FAMILIES = ["toy", "sd15", "sdxl"]


def run_loop(tmp_path, family: str, dtype: str, *overrides: str, runtime=InProcess) -> RunLoop:
    cfg = load_config(SMOKE, [f"model.family={family}", f"model.dtype={dtype}", "data.batch_size=4", f"run.output_dir={tmp_path}", *overrides])
    return RunLoop(cfg, runtime(cfg), log=lambda line: None)


def params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def two_finite_steps(run: RunLoop) -> None:
    rng = torch.Generator().manual_seed(0)
    for step in range(2):
        values = run.trainer.step(run.sampler.batch(step), rng)
        assert values["skipped"] == 0, values
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_are_finite_and_the_masters_stay_float32(tmp_path, family, dtype):
    run = run_loop(tmp_path, family, dtype)
    before = params(run.generator)
    two_finite_steps(run)
    for network in (run.generator, run.trainer.fake):
        assert {p.dtype for p in network.parameters()} == {torch.float32}
    assert not torch.equal(params(run.generator), before)
    frozen = [run.parts.vae, run.parts.conditioner, *build.reward_models(run.cfg).values()]  # held in model.dtype
    assert {p.dtype for network in frozen for p in network.parameters()} == {getattr(torch, dtype)}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_first_bf16_update_agrees_with_float32_and_moves_the_masters_at_lr_1e_6(tmp_path, family):
    grads, updates, before = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        run = run_loop(tmp_path / dtype, family, dtype, "optim.generator.lr=1e-6")
        before[dtype] = params(run.generator)
        run.trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
        grads[dtype] = torch.cat([p.grad.flatten() for p in run.generator.parameters()])
        updates[dtype] = params(run.generator) - before[dtype]
    # Measured on the tiny models: gradient cosine 0.996, update cosine 0.93-0.95 (Adam's first
    # step is nearly sign(g), so entries whose gradient is near zero flip with rounding).
    assert F.cosine_similarity(grads["float32"], grads["bfloat16"], dim=0) > 0.98
    assert F.cosine_similarity(updates["float32"], updates["bfloat16"], dim=0) > 0.85
    moved = updates["bfloat16"] != 0
    assert moved.float().mean() > 0.99  # the float32 masters took the 1e-6 step...
    start = before["bfloat16"].bfloat16()
    rounded_away = (start + updates["bfloat16"].bfloat16()) == start
    assert rounded_away[moved].float().mean() > 0.9  # ...which bf16 weights would have rounded away


def test_float16_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"^config error: model\.dtype: float16 needs loss scaling"):
        load_config(SMOKE, ["model.dtype=float16"])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_deepspeed_engines_train_bf16_over_float32_masters(deepspeed_here, tmp_path, family):
    run = run_loop(tmp_path, family, "bfloat16", "cluster.zero_stage=3", runtime=deepspeed_here)
    two_finite_steps(run)
    for network in (run.generator, run.trainer.fake):
        shards = [p.ds_tensor for p in network.parameters()]
        assert {s.dtype for s in shards} == {torch.float32}
        assert all(torch.isfinite(s).all() for s in shards)  # gloo gathers have raced into NaNs upstream


def grads_and_saved_bytes(module, run, checkpointing: bool) -> tuple[list[torch.Tensor], int]:
    """Gradients of a float64 module's parameters and input, and the bytes its forward kept for
    the backward (checkpointed blocks keep only their inputs and recompute the rest)."""
    if checkpointing:
        module.enable_gradient_checkpointing()
    else:
        module.disable_gradient_checkpointing()
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    module.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x, loss = run()
    loss.backward()
    return [x.grad] + [p.grad for p in module.parameters() if p.grad is not None], saved[0]


def test_gradient_checkpointing_recomputes_without_changing_a_gradient(tiny_pipeline):
    """float64, so that any difference is a bug and not rounding: the UNet (generator, fake score,
    reference backward to x_t) and the VAE decode (the reward's backward to the latents)."""
    parts = load_parts(tiny_pipeline, 1000, torch.float64)
    cond = parts.conditioner(["a small red circle on the left", "a large blue square"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)

    def through_unet():
        leaf = x.clone().requires_grad_()
        return leaf, parts.unet(leaf, torch.tensor([10, 700]), **cond).sample.square().sum()

    def through_vae():
        leaf = x.clone().requires_grad_()
        return leaf, decode_latents(parts.vae, leaf).sin().sum()

    for module, run in ((parts.unet, through_unet), (parts.vae, through_vae)):
        module.requires_grad_(True)
        plain, kept = grads_and_saved_bytes(module, run, checkpointing=False)
        checked, kept_checkpointed = grads_and_saved_bytes(module, run, checkpointing=True)
        assert kept_checkpointed < 0.7 * kept
        assert len(plain) == len(checked)
        assert max((a - b).abs().max().item() for a, b in zip(plain, checked)) < 1e-12


def test_the_config_turns_checkpointing_on_for_every_network_with_a_backward(tmp_path):
    cfg = load_config(SMOKE, ["model.gradient_checkpointing=true", f"run.output_dir={tmp_path}"])
    run = RunLoop(cfg, InProcess(cfg), log=lambda line: None)
    parts = build.reference_parts(cfg)
    reward_vae = build.reward_worker(cfg).decode.args[0]
    networks = [run.generator.unet, run.trainer.fake.unet, build.reference_worker(cfg, parts).denoiser.unet, reward_vae]
    assert [n.is_gradient_checkpointing for n in networks] == [True] * 4
    off = load_config(SMOKE, [f"run.output_dir={tmp_path}"])
    assert not build.reward_worker(off).decode.args[0].is_gradient_checkpointing


def test_a_checkpointed_bf16_forward_keeps_no_copy_of_its_float32_weights():
    """Autocast caches its bfloat16 copy of each trainable float32 weight until the region ends, which
    would keep a whole UNet's copies through a checkpointed forward (0.49 GiB on SD1.5); a UNet is
    called once a region, so the cache saves no cast. Eight 4 MiB layers: 2 MiB of copy each."""
    from torch.utils.checkpoint import checkpoint

    from distar.models.precision import autocast
    from distar.plan.peaks import transient_peak

    layers = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])

    def step():
        with autocast(torch.bfloat16, "cpu"):
            x = torch.ones(1, 1024, requires_grad=True)
            for layer in layers:
                x = checkpoint(layer, x, use_reentrant=False)
        x.float().sum().backward()

    step()  # the gradients exist from here on, as in training
    assert transient_peak(step, [layers]) < 8 * 2**20  # one layer's copies at a time, not all 16 MiB
