"""The memory plan: ZeRO's accounting, the fit rule, the measured activation peaks (fake tensors
against real ones), jobs/plan.py on the published SD1.5 preset, and the check jobs/train.py makes."""

import pytest

from distar.cluster.engines import REDUCE_BUCKET
from distar.config import load_config
from distar.errors import UserError
from distar.models import published
from distar.plan import architectures, fit, peaks

GIB = fit.GIB
NETS = [dict(params=1_000_000, persistent=100_000, largest_layer=50_000)] * 2  # generator and fake score
MEASURED = peaks.Measured(frozen_params=10_000, frozen_bytes=20_000, trainable=NETS, activations=7_000)


def trainer_at(stage: int, workers: int, *sets: str) -> fit.Role:
    cfg = load_config(None, [f"cluster.zero_stage={stage}", f"cluster.trainer_workers={workers}", *sets])
    return fit.trainer_role(cfg, MEASURED)


def test_zero_shards_the_states_then_the_gradients_then_the_weights():
    p = 2_000_000  # both networks
    buckets = 2 * 4 * REDUCE_BUCKET  # a float32 reduction bucket for each network's engine: two of them under ZeRO-1/2 on a GPU
    one = trainer_at(1, 4)
    assert (one.weights, one.gradients, one.states) == (20_000 + 4 * p, 4 * p + 2 * buckets, 8 * p // 4)
    two = trainer_at(2, 4)
    assert (two.weights, two.gradients, two.states) == (20_000 + 4 * p, 4 * p // 4 + 2 * buckets, 8 * p // 4)
    three = trainer_at(3, 4)  # a quarter of the sharded part, the persistent part whole, one layer gathered
    assert three.weights == 20_000 + 4 * (2 * (900_000 // 4 + 100_000) + 50_000)
    assert (three.gradients, three.states, three.activations) == (4 * p // 4 + buckets, 8 * p // 4, 7_000)
    assert (three.params, three.trainable) == (p + 10_000, p)
    assert trainer_at(3, 1).training > trainer_at(3, 2).training > three.training
    # before ZeRO shards them: the reference UNet in float32 and the two masters copied from it
    assert three.loading == 20_000 + 3 * 4 * 1_000_000 and three.total == max(three.loading, three.training)
    # with adapters on one base: the base among the frozen networks, adapters alone trained, no float32 UNet while loading
    lora = fit.trainer_role(load_config(None, ["cluster.zero_stage=2", "cluster.trainer_workers=4", "model.lora={rank: 4}"]), MEASURED)
    assert (lora.weights, lora.gradients, lora.states, lora.loading) == (20_000 + 4 * p, 4 * p // 4 + 2 * buckets, 8 * p // 4, 20_000 + 4 * p)
    # the generator's EMA: float32 on what the rank steps, its partition under ZeRO-3
    assert trainer_at(3, 4, "optim.ema_decay=0.99").states - three.states == 4 * 1_000_000 // 4
    assert trainer_at(1, 4, "optim.ema_decay=0.99").states - one.states == 4 * 1_000_000


def test_a_role_fits_its_share_of_a_gpu_with_headroom():
    role = fit.Role("reward replica", 2, 0.5, 1, 0, weights=3 * GIB, gradients=0, states=0, activations=GIB, remedy="")
    assert role.share(24) == 12 * GIB and role.fits(24)  # 4 GiB + 1.4 GiB headroom within half of 24 GiB
    assert not role.fits(10)  # 5.4 GiB above half of 10 GiB
    role.gpus = 2.0  # a replica's networks live on one GPU however many it asks
    assert role.share(24) == 24 * GIB
    with pytest.raises(fit.DoesNotFit, match=r"reward replica: needs 4\.00 GiB .* but has 4\.00 GiB \(1 of a 4 GiB GPU\)"):
        fit.check([role], 4)
    role.gpus = 0  # a CPU role is never checked against a GPU
    fit.check([role], 4)


@pytest.mark.slow
def test_a_run_on_cpu_is_not_planned_and_a_gpu_run_that_cannot_fit_is_refused():
    assert fit.check_run(load_config(), 80) is None
    cfg = load_config(None, ["cluster.trainer_gpus=1"])
    with pytest.raises(fit.DoesNotFit, match=r"^memory plan: trainer rank: needs .* but has 0\.01 GiB \(1 of a 0\.01 GiB GPU\); more cluster\.trainer_workers"):
        fit.check_run(cfg, 0.01)


def test_the_activation_peak_is_the_works_worst_moment_not_the_one_of_the_largest_total():
    """A temporary freed before the gradients arrive: the total peaks at the gradients, but the work's
    own tensors peaked earlier (as full fine-tuning's activations do before its float32 gradients)."""
    import torch

    # 8 MiB of weights; the backward computes each layer's 4 MiB gradient, then keeps it: 16 MiB at the end
    layers = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))

    def work():
        temporary = torch.ones(6 * 2**18)  # 6 MiB (a total of 14), freed at once
        del temporary
        layers(torch.ones(1, 1024)).sum().backward()

    assert 6 * 2**20 <= peaks.transient_peak(work, [layers]) < 6.5 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("role, sets", [(peaks.trainer, []), (peaks.trainer, ["model.lora={rank: 4}", "model.dtype=bfloat16"]),
                                        (peaks.reference, []), (peaks.reward, [])], ids=["trainer", "trainer-lora-bf16", "reference", "reward"])
def test_fake_tensors_measure_the_same_peak_as_real_ones(role, sets):
    """The plan's peak (fake tensors: nothing allocated) against what torch's allocator holds at most
    while the same work runs on real tensors, kernels' own buffers included."""
    cfg = load_config(None, ["model.reference=tiny-random", "rewards.0.source=tiny-random", "rewards.1.source=tiny-random", *sets])
    arch = architectures.architecture(cfg)
    planned, real = role(arch, cfg, fake=True), role(arch, cfg, fake=False, peak=peaks.allocated_peak)
    assert (planned.frozen_bytes, planned.trainable) == (real.frozen_bytes, real.trainable)
    assert real.activations > 0 and abs(planned.activations - real.activations) <= 0.01 * real.activations


@pytest.mark.slow
@pytest.mark.parametrize("sets", [[], ["model.dtype=bfloat16"], ["model.lora={rank: 64}"]], ids=["float32", "bf16", "lora"])
def test_the_loading_rule_is_what_the_trainers_loading_code_holds(sets):
    """The trainer's loading peak is a rule (three float32 UNets; with LoRA the base and its adapters),
    checked against the trainer's own loading code. Not LoRA in bfloat16: there diffusers casts the
    float32 checkpoint on the host, before the parts move to the GPU (docs/benchmarks.md)."""
    cfg = load_config(None, ["model.reference=tiny-random", "rewards.0.source=tiny-random", "rewards.1.source=tiny-random", *sets])
    planned = fit.trainer_role(cfg, peaks.trainer(architectures.architecture(cfg), cfg)).loading
    measured = peaks.trainer_loading(cfg)
    assert measured > 0 and abs(planned - measured) <= 0.02 * measured


@pytest.mark.slow
def test_the_sd15_preset_is_planned_offline_and_fits_40_gb_but_not_24(jobs):
    done = jobs.run("plan.py", "--config", "jobs/configs/sd15.yaml")
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")}
    trainer, reference = rows["trainer rank"], rows["reference replica"]
    assert float(trainer[4]) == pytest.approx(2 * 859.52, abs=0.1)  # generator and fake score: SD1.5's UNet twice
    assert float(reference[3]) == pytest.approx(859.52 + 123.06 + 83.65, abs=0.1)  # UNet, CLIP ViT-L/14's text tower, VAE
    assert trainer[-4:] == ["fits", "fits", "fits", "fits |"]
    assert rows["reward replica"][-4:] == ["no", "fits", "fits", "fits |"]  # half a GPU: VAE decode with gradients at 512 px
    assert done.stdout.splitlines()[-1] == "fits: A100 40GB, A100 / H100 80GB, H200"


BAD = [
    (["model.family=toy", "model.reference=someone/some-model"], "cannot plan: model.reference: 'someone/some-model' is not a folder, and family 'toy'"),
    (["model.reference=/no/such/folder"], "error: model.reference: '/no/such/folder' is not a folder"),
    (["rewards.0.name=hpsv2"], "cannot plan: rewards.0.source: hpsv2 is built by its own package"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=["unknown-architecture", "missing-folder", "packaged-reward"])
def test_a_plan_that_cannot_be_made_names_the_source(overrides, message):
    with pytest.raises(UserError) as refused:
        fit.roles(load_config(None, overrides))
    assert str(refused.value).startswith(message)


def test_jobs_plan_ends_a_plan_that_cannot_be_made_with_one_line_and_exit_2(jobs):
    done = jobs.run("plan.py", "--set", "model.family=toy", "--set", "model.reference=someone/some-model", timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and done.stderr.startswith(BAD[0][1]), done.stderr


@pytest.mark.parametrize("config,cls,millions", [
    (published.SDXL_UNET, "diffusers.UNet2DConditionModel", 2567.46),
    (published.SDXL_TEXT_2, "transformers.CLIPTextModelWithProjection", 694.66),
    (published.CLIP_VIT_H14, "transformers.CLIPModel", 986.11),
    (published.CLIP_VIT_L14, "transformers.CLIPModel", 427.62),
], ids=["sdxl-unet", "sdxl-text-2", "clip-vit-h14", "clip-vit-l14"])
def test_the_shipped_architectures_have_the_published_sizes(config, cls, millions):
    assert architectures.Net(cls, config).params() / 1e6 == pytest.approx(millions, abs=0.01)
