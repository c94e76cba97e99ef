"""DeepSpeed engines for the generator and the fake score, one per network on every trainer rank.

ZeRO-3 (the default across several ranks) shards each network's parameters, gradients and Adam
states across the trainer ranks; forward hooks gather a layer's parameters when it runs, so the
roles' code calls the networks as plain modules. Every forward and backward is a collective: all
ranks make the same calls. One rank has nothing to shard and runs ZeRO-1 (config.ClusterSection.zero).
DeepSpeed's accelerator (cuda or cpu) is the worker's DS_ACCELERATOR (distar.cluster.session.worker_env).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distar.config import OptimizerSpec, RunConfig
from distar.roles.trainer import Update
from distar.run.ema import GeneratorEMA, with_average

PERSISTENCE_THRESHOLD = 100_000  # parameters smaller than this stay whole on every ZeRO-3 rank (distar.plan reads it)
# Elements a gradient-reduction bucket holds. DeepSpeed's default (5e8) allocates 2 GB of float32 per
# bucket up front (ZeRO-3: one per engine; ZeRO-1/2: one per engine, two with overlap_comm); 5e7 is 200 MB.
REDUCE_BUCKET = 50_000_000


def ds_config(cfg: RunConfig, spec: OptimizerSpec) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,  # DeepSpeed clips at 1.0 unless told
        # float32 masters, gradients and Adam states, as in one process: the networks' forwards run
        # under autocast in model.dtype (distar.models.precision), so DeepSpeed's bf16 mode stays off.
        "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": cfg.zero(),
            "reduce_bucket_size": REDUCE_BUCKET,  # distar.plan counts these buffers
            "overlap_comm": torch.cuda.is_available(),  # no streams to overlap on CPU
            # Parameters under 1e5 elements stay whole on every rank (DeepSpeed's default), where a gather
            # costs more than the memory it saves; gradients and Adam states are sharded all the same.
            "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
            "stage3_prefetch_bucket_size": 0,  # no trace-based prefetch: the call order varies with K and alpha
        },
        # torch's own AdamW: DeepSpeed's fused and CPU Adam ops need a compiler at first use.
        "optimizer": {"type": "AdamW", "params": {"lr": spec.lr, "betas": list(spec.betas), "eps": spec.eps,
                                                  "weight_decay": spec.weight_decay, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def engine_for(module: nn.Module, cfg: RunConfig, spec: OptimizerSpec):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                                      config=ds_config(cfg, spec))
    return engine


def time_zero(engine, timing) -> None:
    """Count ZeRO-3's own work as the step part "zero": the parameter coordinator's gathers and
    releases (around every submodule's forward and backward) and the gradients' reduce-scatter.
    Other stages gather nothing; their gradient reduction stays in the update's time."""
    optimizer = engine.optimizer
    offload = getattr(optimizer, "parameter_offload", None)
    if offload is None:
        return
    coordinator = offload.get_param_coordinator()
    for owner, name in ((coordinator, "fetch_sub_module"), (coordinator, "release_sub_module"),
                        (optimizer, "reduce_ready_partitions_and_remove_grads"), (optimizer, "independent_gradient_partition_epilogue")):
        setattr(owner, name, timing.timed("zero", getattr(owner, name)))  # DeepSpeed calls these through the instance


class EngineUpdate:
    """The DeepSpeed counterpart of distar.run.in_process.TorchUpdate: backward (gradients averaged over
    the ranks), clip by global norm, AdamW on this rank's shard. ZeRO (stages 1-3) skips the step when the
    global norm is not finite, on every rank, and reports that norm."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, loss: Tensor) -> float:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


class Engines:
    """This rank's engines for both networks (under their tags in a checkpoint) and the generator's
    EMA (distar.run.ema, when optim.ema_decay is set): their updates, and their state written to and
    read from one folder. Collective: every rank writes its shards and its piece of the EMA, rank 0
    the module states."""

    def __init__(self, generator: nn.Module, fake: nn.Module, cfg: RunConfig, timing, rank: int):
        optim = cfg.optim
        self.by_tag = {"generator": engine_for(generator, cfg, optim.generator), "fake_score": engine_for(fake, cfg, optim.fake_score)}
        for engine in self.by_tag.values():
            time_zero(engine, timing)
        self.ema, self.rank = GeneratorEMA.of(generator, optim.ema_decay), rank  # after the engines: it averages ZeRO-3's partitions
        self.frozen = cfg.model.lora is not None  # adapters on a base that is not in the checkpoints

    def updates(self) -> tuple[Update, Update]:
        return with_average(EngineUpdate(self.by_tag["generator"]), self.ema), EngineUpdate(self.by_tag["fake_score"])

    def write(self, folder: str) -> None:
        for tag, engine in self.by_tag.items():  # with model.lora, not the frozen base both networks share
            engine.save_checkpoint(folder, tag=tag, save_latest=False, exclude_frozen_parameters=True)
        if self.ema:
            self.ema.save(Path(folder), self.rank)

    def read(self, folder: str) -> None:
        for tag, engine in self.by_tag.items():
            engine.load_checkpoint(folder, tag=tag, load_module_strict=not self.frozen)
        if self.ema:
            self.ema.load(Path(folder), self.rank)


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank if `ok` is True on every rank."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    # On the backend's device: NCCL reduces only CUDA tensors.
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=get_accelerator().current_device_name())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gathered(module: nn.Module):
    """A context in which every rank holds the module's full parameters (ZeRO-3 gathers them; a
    no-op for unsharded modules). Read-only: edits made inside are discarded."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
