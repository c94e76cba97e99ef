"""LoRA (model.lora): the generator and the fake score as adapters on one frozen base, the reference
UNet itself; what trains, what a checkpoint holds, what the export writes, and the same update in
one process, on DeepSpeed engines and across two Ray Train ranks. (Split equals monolithic with
adapters: tests/test_split.py.)"""

import pytest
import torch

from distar.config import ConfigError, load_config
from distar.models import lora
from distar.run import build, in_process
from distar.run.loop import RunLoop
from exported import exported_unet, largest_difference

SMOKE = "jobs/configs/smoke.yaml"
LORA = ["model.lora={rank: 4, alpha: 8}"]
# An Adam eps that keeps weights with rounding-level gradients still (tests/test_cluster.py says why).
ALIKE = [*LORA, "optim.generator.eps=1e-5", "optim.fake_score.eps=1e-5", "data.validation_size=0"]


def test_zero_3_is_refused_and_several_workers_default_to_zero_2():
    with pytest.raises(ConfigError, match="cluster.zero_stage: 3 shards parameters, but with model.lora the generator and the fake score share one frozen base"):
        load_config(SMOKE, [*LORA, "cluster.zero_stage=3"])
    assert load_config(SMOKE, [*LORA, "cluster.trainer_workers=2"]).zero() == 2
    assert load_config(SMOKE, [*LORA]).zero() == 1 and load_config(SMOKE, ["cluster.trainer_workers=2"]).zero() == 3
    with pytest.raises(ConfigError, match="model.lora.rank"):
        load_config(SMOKE, ["model.lora={rank: 0}"])


def test_a_target_that_names_no_module_is_refused_before_anything_loads():
    """Checked on the reference UNet's architecture (the meta device: no weights), naming the target."""
    cfg = load_config(SMOKE, ["model.lora={target_modules: [to_q, to_query]}"])
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: 'to_query' names no Linear or Conv2d module of the UNet \(its layers end in names such as"):
        build.check_inputs(cfg)
    build.check_inputs(load_config(SMOKE, ["model.lora={target_modules: [to_q, attn1.to_k, proj_in]}"]))  # names and suffixes


def test_the_adapters_share_one_frozen_base_in_the_training_dtype():
    """bf16 forwards: the base (the reference UNet the in-process reference worker calls) in bf16,
    frozen; float32 adapters the only trainable parameters, the only ones with optimiser state; a
    fresh adapter leaves the generator its base (B = 0)."""
    cfg = load_config(SMOKE, [*LORA, "model.dtype=bfloat16"])
    parts = build.reference_parts(cfg, trainer=True)
    generator, fake = build.trainable_networks(cfg, parts)
    base = {id(p) for p in parts.unet.parameters()}
    for unet in (generator.unet, fake.unet):
        frozen = [p for p in unet.parameters() if not p.requires_grad]
        assert {id(p) for p in frozen} == base and all(p.dtype == torch.bfloat16 for p in frozen)
        trained = [p for p in unet.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained) and sum(p.numel() for p in trained) < 0.05 * sum(p.numel() for p in frozen)
    assert not {id(p) for p in generator.parameters() if p.requires_grad} & {id(p) for p in fake.parameters() if p.requires_grad}
    runtime = in_process.InProcess(cfg)
    runtime.updates(generator, fake)
    optimised = {id(p) for group in runtime.networks["generator"].opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in generator.parameters() if p.requires_grad}
    assert torch.equal(lora.merged(generator.unet).state_dict()["conv_in.weight"], parts.unet.state_dict()["conv_in.weight"].float())


def test_the_model_card_says_what_the_folder_holds():
    from distar.tracking.registry import model_card

    card = model_card(load_config(SMOKE, LORA), {}, 399)
    assert ("- Training: a LoRA adapter (rank 4, alpha 8, on to_q, to_k, to_v, to_out.0); unet/ holds it merged into its base, and "
            "`pytorch_lora_weights.safetensors` the adapter alone: `pipe.load_lora_weights(folder)` on a pipeline of `tiny-random`") in card
    assert "- Training: full fine-tuning of the UNet" in model_card(load_config(SMOKE), {}, 399)


@pytest.mark.slow
def test_a_run_checkpoints_the_adapters_resumes_and_exports_merged_and_loadable(tmp_path):
    from diffusers import StableDiffusionPipeline

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    in_process.train(load_config(SMOKE, [*ALIKE, "run.steps=3", f"run.output_dir={whole}"]), log=lambda line: None)
    for steps in (2, 3):
        in_process.train(load_config(SMOKE, [*ALIKE, "run.checkpoint_every=2", f"run.steps={steps}", f"run.output_dir={halves}"]), log=lambda line: None)
    saved = torch.load(halves / "checkpoints" / "checkpoint_000002" / "generator.pt", weights_only=True)["module"]
    assert saved and all(".lora_" in k for k in saved)  # the adapter alone: the base is the reference's
    assert largest_difference(exported_unet(halves), exported_unet(whole)) == 0  # one process: bit for bit

    reference = StableDiffusionPipeline.from_pretrained(build.reference_folder(load_config(SMOKE)))
    before = {k: v.clone() for k, v in reference.unet.state_dict().items()}
    reference.load_lora_weights(whole / "generator")  # the adapter file, onto the reference
    reference.fuse_lora()
    reference.unload_lora_weights()
    merged = exported_unet(whole)
    assert largest_difference(reference.unet.state_dict(), merged) < 1e-6
    assert largest_difference(before, merged) > 1e-4  # trained: the merged UNet is not the reference's


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_a_deepspeed_step_on_adapters_equals_the_adamw_step(deepspeed_here, tmp_path, stage):
    cfg = load_config(SMOKE, [*ALIKE, "data.batch_size=4", f"cluster.zero_stage={stage}", f"run.output_dir={tmp_path}"])
    expected = in_process.run_loop(cfg, log=lambda line: None)
    expected.trainer.step(expected.sampler.batch(0), torch.Generator().manual_seed(0))
    run = RunLoop(cfg, deepspeed_here(cfg), log=lambda line: None)
    run.trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(0))
    trained = lambda unet: torch.cat([p.detach().flatten() for p in unet.parameters() if p.requires_grad])  # noqa: E731
    got, want = trained(run.generator.unet), trained(expected.generator.unet)
    assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-6 and (want != 0).any()


@pytest.mark.slow
def test_across_two_ray_train_ranks_the_adapters_train_as_in_one_process(ray_cluster, jobs, tmp_path):
    """Two ranks under ZeRO-2 (the default with adapters), 2 prompts each, against one process on all 4."""
    in_process.train(load_config(SMOKE, [*ALIKE, "data.batch_size=4", "run.steps=2", f"run.output_dir={tmp_path / 'one'}"]), log=lambda line: None)
    sets = [*ALIKE, "data.batch_size=2", "cluster.trainer_workers=2", "run.steps=2", f"run.output_dir={tmp_path / 'two'}"]
    proc = jobs.run("train.py", "--config", SMOKE, *[a for s in sets for a in ("--set", s)], env=ray_cluster.run_env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert (tmp_path / "two" / "generator" / lora.WEIGHTS_NAME).is_file()
    assert largest_difference(exported_unet(tmp_path / "two"), exported_unet(tmp_path / "one")) < 1e-6
