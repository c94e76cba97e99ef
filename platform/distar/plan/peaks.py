"""The activation peak of one micro-batch of each role's work, measured, not estimated.

Each role's networks are built from their configs (distar.plan.architectures) under
torch's FakeTensorMode, which allocates nothing, and the role's own code runs one micro-batch
while torch's MemTracker counts every tensor that lives: the peak beyond the weights, gradients
and optimiser states is what the work itself needs at its worst moment (activations saved for
backward, autograd's temporaries, autocast's low-precision copies of float32 weights, the
AdamW step's temporaries). The same functions on real tensors (fake=False) check the method.

- trainer: the generator update, the largest of a rank's graphs: the generator's forward with
  gradient, the fake score's forward on x_t (frozen, gradient through its input, as
  TrainerStep.step does), one backward through both and the AdamW step, at data.batch_size.
- reference replica: ReferenceWorker on a merged request of the pool's max_batch_size (CFG
  doubles the UNet's batch; the score divergence back-propagates to x_t, KL runs without grad).
- reward replica: RewardWorker on max_batch_size latents: VAE decode and every reward model,
  each back-propagated to the latents.
model.gradient_checkpointing is honoured where build.checkpointed honours it. Each role takes
the measurement as `peak(work, held)`: transient_peak by default; allocated_peak, on real tensors,
reads torch's CPU allocator instead (tests/test_plan.py, bench/plan_check.py), which also sees
the buffers kernels allocate for themselves.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from distar.cluster.engines import PERSISTENCE_THRESHOLD
from distar.config import RunConfig
from distar.errors import UserError
from distar.models import lora, precision, tiny
from distar.models.tokenizer import build_word_tokenizer
from distar.plan.architectures import Architecture, RewardNet, default_dtype

HELD = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD)  # what a role holds, sized by ZeRO's rules (distar.plan.fit)


class _TransientPeak(MemTracker):
    """MemTracker's accounting, keeping only the peak of what is not held: the work's own tensors
    at their worst moment. Not those live at the moment of the largest total: there, in full
    fine-tuning, the float32 gradients have arrived and most activations are gone (SD1.5 at 512 px:
    0.59 GiB live then, 1.85 GiB at worst), while ZeRO shards those gradients and LoRA has almost
    none. Its per-module peaks walk every module at every operation (minutes for one UNet step),
    so they are skipped; gradient hooks go only on modules that train (it would hook frozen
    parameters too, which torch refuses)."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        trains = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trains)

    def _update_peak_stats(self, peak_state) -> None:
        live = sum(snap["Total"] - sum(snap[k] for k in HELD) for snap in self._curr_mem_snap.values())
        self.peak = max(self.peak, live)


def transient_peak(work: Callable[[], object], held: list) -> int:
    """Bytes beyond the held modules' weights and buffers, their gradients and the optimisers'
    states (as they were before) at the worst moment of work()."""
    tracker = _TransientPeak()
    tracker.track_external(*held)
    with tracker:
        states = sum(snap[_MemRefType.OPT] for snap in tracker.get_tracker_snapshot("current").values())
        work()
    return tracker.peak - states


def allocated_peak(work: Callable[[], object], held: list) -> int:
    """The most bytes torch's CPU allocator holds at once beyond what it held before, while work()
    runs after one warm-up run (lazily built state, such as oneDNN's primitives, is not the work's
    peak): CPU's counterpart of CUDA's max_memory_allocated, from the profiler's allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    work()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:  # alloc_size is negative for a free
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    held_now = peak = 0
    for _, size in sorted(events):
        held_now += size
        peak = max(peak, held_now)
    return peak


def trainer_loading(cfg: RunConfig, peak=allocated_peak) -> int:
    """The peak of the trainer's own loading code (distar.run.build) on real tensors on the CPU: the
    check of distar.plan.fit's loading rule, which fake tensors cannot run (loading reads files)."""
    from distar.run import build

    return peak(lambda: build.trainable_networks(cfg, build.reference_parts(cfg, "cpu", trainer=True)), [])


@dataclass
class Measured:
    """What one role holds and needs: its networks' sizes and the peak of its work."""

    frozen_params: int  # parameters held frozen, in their dtypes...
    frozen_bytes: int  # ...taking these bytes
    trainable: list[dict]  # per trainable network: params, persistent (kept whole by ZeRO-3), largest_layer
    activations: int


def _mode(fake: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode() if fake else contextlib.nullcontext()


def _frozen(*modules: nn.Module) -> tuple[int, int]:
    params = [p for m in modules for p in m.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _trainable(module: nn.Module, trained: list[nn.Parameter]) -> dict:
    """The sizes ZeRO's accounting needs of the module's `trained` parameters."""
    ids = {id(p) for p in trained}
    sizes = [p.numel() for p in trained]
    layers = [sum(p.numel() for p in m.parameters(recurse=False) if id(p) in ids) for m in module.modules()]
    return dict(params=sum(sizes), persistent=sum(n for n in sizes if n < PERSISTENCE_THRESHOLD), largest_layer=max(layers))


@contextlib.contextmanager
def _adapters_left_where_built():
    """Module.to as a no-op while adapters are added. peft moves each new adapter to its base layer's
    device and dtype, which a fake module cannot do (it cannot swap its parameters); built on that
    device in float32, the adapters are already where distar.models.lora puts them after the move."""
    to = nn.Module.to
    nn.Module.to = lambda module, *args, **kwargs: module
    try:
        yield
    finally:
        nn.Module.to = to


def _checkpointed(cfg: RunConfig, module: nn.Module) -> nn.Module:
    from distar.run.build import checkpointed

    return checkpointed(cfg, module)


def _prompts(n: int) -> list[str]:
    return [tiny.PROMPTS[i % len(tiny.PROMPTS)] for i in range(n)]


def _tokenizer(max_length: int):
    """A byte-level tokenizer without merges, padding to the encoder's length: the plan needs token
    counts, not a vocabulary, and its 514 ids are within every CLIP's (the smallest, built by the
    same builder from a few words, has these and its merges)."""
    return build_word_tokenizer([], max_length=max_length)


def _conditioner(arch: Architecture, cfg: RunConfig, dtype: torch.dtype):
    """The run's text conditioner over the architecture's encoders, with _tokenizer's."""
    from distar.models.diffusion import SDXLConditioner, TextConditioner

    encoders = [net.build(dtype) for net in arch.texts]
    tokenizers = [_tokenizer(e.config.max_position_embeddings) for e in encoders]
    if len(encoders) == 1:
        return TextConditioner(tokenizers[0], encoders[0])
    return SDXLConditioner(tokenizers[0], encoders[0], tokenizers[1], encoders[1], cfg.model.resolution, arch.zeros_for_empty)


def latent_shape(arch: Architecture, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(arch.vae.config["block_out_channels"]) - 1)
    if resolution % factor:
        raise UserError(f"model.resolution: {resolution} is not a multiple of the VAE's factor {factor}")
    return (arch.unet.config.get("in_channels", 4), resolution // factor, resolution // factor)


def trainer(arch: Architecture, cfg: RunConfig, fake: bool = True, peak=transient_peak) -> Measured:
    from distar.models.diffusion import Denoiser, OneStepGenerator
    from distar.objectives import Schedule

    dtype, n = precision.DTYPES[cfg.model.dtype], cfg.data.batch_size
    with _mode(fake):
        schedule = Schedule.from_scheduler_config(arch.scheduler)
        conditioner = _conditioner(arch, cfg, dtype)
        vae = arch.vae.build(dtype)  # held by every rank (distar.run.loop), used by rank 0's validation
        if cfg.model.lora is None:  # float32 masters (build.trainable_networks)
            bases, (gen_unet, fake_unet) = [], (arch.unet.build().requires_grad_(True) for _ in range(2))
        else:  # float32 adapters on one frozen base in model.dtype (distar.models.lora)
            bases = [arch.unet.build(dtype)]
            with _adapters_left_where_built():
                gen_unet, fake_unet = (lora.with_adapter(bases[0], cfg.model.lora) for _ in range(2))
        trained = [[p for p in unet.parameters() if p.requires_grad] for unet in (gen_unet, fake_unet)]
        fake_unet.requires_grad_(False)  # frozen through the generator update
        generator = OneStepGenerator(_checkpointed(cfg, gen_unet), schedule, cfg.model.t_star, dtype)
        fake_score = Denoiser(_checkpointed(cfg, fake_unet), schedule, dtype)
        spec = cfg.optim.generator
        optimizer = torch.optim.AdamW(trained[0], lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
        for p in trained[0]:  # the states exist from the first step on: create them
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cond = conditioner(_prompts(n))
        shape = (n, *latent_shape(arch, cfg.model.resolution))
        z, eps = torch.randn(shape), torch.randn(shape)
        t = torch.randint(cfg.objective.t_min, cfg.objective.t_max + 1, (n,))

        def update():
            x0 = generator(z, cond)
            x_t = schedule.add_noise(x0, eps, t)
            (fake_score(x_t, t, cond) - x0).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        activations = peak(update, [gen_unet, fake_unet, conditioner, vae, optimizer])
        return Measured(*_frozen(conditioner, vae, *bases), [_trainable(unet, params) for unet, params in zip((gen_unet, fake_unet), trained)], activations)


def reference(arch: Architecture, cfg: RunConfig, fake: bool = True, peak=transient_peak) -> Measured:
    from distar.models.diffusion import Denoiser
    from distar.objectives import Schedule
    from distar.roles.reference_worker import ReferenceRequest, ReferenceWorker
    from distar.roles.trainer import divergence_spec

    dtype, n = precision.DTYPES[cfg.model.dtype], cfg.cluster.reference_pool.max_batch_size
    with _mode(fake):
        schedule = Schedule.from_scheduler_config(arch.scheduler)
        conditioner = _conditioner(arch, cfg, dtype)
        unet = _checkpointed(cfg, arch.unet.build(dtype))
        vae = arch.vae.build(dtype)  # loaded with the reference's parts (distar.run.build.reference_parts), unused
        worker = ReferenceWorker(Denoiser(unet, schedule, dtype), conditioner)
        shape = (n, *latent_shape(arch, cfg.model.resolution))
        t = torch.randint(cfg.objective.t_min, cfg.objective.t_max + 1, (n,))
        request = ReferenceRequest(torch.randn(shape), t, _prompts(n), torch.randn(shape), torch.randn(shape), divergence_spec(cfg.objective))
        activations = peak(lambda: worker(request), [unet, conditioner, vae])
        return Measured(*_frozen(unet, conditioner, vae), [], activations)


def _reward_model(net: RewardNet, dtype: torch.dtype) -> nn.Module:
    """The reward wrapper distar.rewards loads, around a CLIP built from its config, in the run's
    dtype (distar.run.build.reward_models)."""
    from distar.rewards.aesthetic import AestheticHead, AestheticReward
    from distar.rewards.clip import ClipReward
    from distar.rewards.preprocess import Preprocess

    clip = net.clip.build(dtype)
    with default_dtype(dtype):
        preprocess = Preprocess(*(net.preprocessing or (clip.config.vision_config.image_size,)))
        if net.name == "aesthetic":  # the text tower is dropped after loading
            return AestheticReward(clip.vision_model, clip.visual_projection, AestheticHead(clip.visual_projection.out_features), preprocess)
    tokenizer = _tokenizer(clip.config.text_config.max_position_embeddings)
    return ClipReward(clip, tokenizer, net.name, preprocess)


def reward(arch: Architecture, cfg: RunConfig, fake: bool = True, peak=transient_peak) -> Measured:
    from distar.models.diffusion import decode_latents
    from distar.roles.reward_worker import RewardRequest, RewardWorker

    dtype, n = precision.DTYPES[cfg.model.dtype], cfg.cluster.reward_pool.max_batch_size
    with _mode(fake):
        vae = _checkpointed(cfg, arch.vae.build(dtype).requires_grad_(False).eval())
        models = {net.name: _reward_model(net, dtype) for net in arch.rewards}
        worker = RewardWorker(functools.partial(decode_latents, vae), models)
        request = RewardRequest(torch.randn(n, *latent_shape(arch, cfg.model.resolution)), _prompts(n))
        activations = peak(lambda: worker(request), [vae, *models.values()])
        return Measured(*_frozen(vae, *models.values()), [], activations)
