"""Whether a run fits its GPUs: each role's bytes on one GPU, under the configured ZeRO stage and worker count.

A trainer rank holds the generator and the fake score as float32 masters (distar.cluster.engines):
4 bytes a parameter of weights, 4 of gradients and 8 of AdamW states for each, and each engine's
gradient-reduction buckets (engines.REDUCE_BUCKET float32 elements: two under ZeRO-1/2 on a GPU,
one under ZeRO-3), counted with the gradients. ZeRO shards the
states over the trainer workers from stage 1, the gradients too from stage 2, the weights too at
stage 3, except the parameters DeepSpeed keeps whole on every rank (distar.cluster.engines.PERSISTENCE_THRESHOLD)
and the one layer it gathers while that layer runs. Frozen networks (text encoders and VAE on the trainer;
UNet, text encoders and VAE on a reference replica; VAE and reward models on a reward replica)
are whole, in model.dtype. With optim.ema_decay, the generator's average (float32, on the rank's
partition under ZeRO-3) counts with the optimiser states. The activation peak of one micro-batch
is measured (distar.plan.peaks) and added to the whole gradients: a bound, as the gradients
arrive while the activations are freed.
Before ZeRO shards anything, a trainer rank loads the reference UNet in float32 and copies it into
both masters (distar.run.loop): three whole float32 UNets, often the larger of its two peaks. With
model.lora it holds the UNet once, frozen, in model.dtype, among its frozen networks, and trains
float32 adapters (distar.models.lora): they alone have gradients and Adam states.

A role fits a GPU when its bytes plus headroom() (the CUDA context, NCCL's buffers and the caching
allocator's fragmentation) are within its share of it: a replica with num_gpus 0.5 has half a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from distar.cluster.engines import REDUCE_BUCKET
from distar.config import RunConfig
from distar.errors import UserError
from distar.plan import architectures, peaks

GIB = 2**30
# GPU memory of the kinds a plan is printed for, in GiB as the driver reports them.
GPU_KINDS = {"L4 / RTX 4090": 24, "A100 40GB": 40, "A100 / H100 80GB": 80, "H200": 141}


def headroom(total: int) -> int:
    """1 GiB (CUDA context and NCCL) and 10% (allocator fragmentation) above a role's own bytes."""
    return GIB + total // 10


class DoesNotFit(UserError):
    kind = "memory plan"


@dataclass
class Role:
    name: str  # "trainer rank", "reference replica", "reward replica"
    processes: int  # of this role in the run
    gpus: float  # per process (0: runs on CPU, not planned against a GPU)
    params: int
    trainable: int
    weights: int
    gradients: int
    states: int
    activations: int
    remedy: str  # what lowers it
    loading: int = 0  # bytes held while loading, before ZeRO shards them

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.states + self.activations

    @property
    def total(self) -> int:
        return max(self.training, self.loading)

    def share(self, gpu_gib: float) -> int:
        """Bytes of one GPU this role may use: a fraction of it, or one whole GPU (a replica with
        several GPUs still holds its networks on one)."""
        return int(min(self.gpus, 1.0) * gpu_gib * GIB)

    def fits(self, gpu_gib: float) -> bool:
        return self.total + headroom(self.total) <= self.share(gpu_gib)


def trainer_role(cfg: RunConfig, measured: peaks.Measured) -> Role:
    stage, n = cfg.zero(), cfg.cluster.trainer_workers
    nets = measured.trainable  # the generator's first
    trainable = sum(net["params"] for net in nets)
    own = [-(-(net["params"] - net["persistent"]) // n) + net["persistent"] if stage == 3 else net["params"] for net in nets]
    held = sum(own) + (max(net["largest_layer"] for net in nets) if stage == 3 else 0)  # ZeRO-3 gathers one layer at a time
    buckets = len(nets) * 4 * REDUCE_BUCKET * (1 if stage == 3 else 2)  # float32 reduction buffers, each engine's, on a GPU (overlap_comm)
    generator = nets[0]["params"]  # its average: float32, on this rank's partition under ZeRO-3 (distar.run.ema)
    ema = 4 * (-(-generator // n) if stage == 3 else generator) if cfg.optim.ema_decay is not None else 0
    return Role("trainer rank", n, cfg.cluster.trainer_gpus, measured.frozen_params + trainable, trainable,
                measured.frozen_bytes + 4 * held, 4 * (-(-trainable // n) if stage >= 2 else trainable) + buckets,
                8 * -(-trainable // n) + ema, measured.activations,
                "more cluster.trainer_workers under ZeRO-3, model.gradient_checkpointing or a smaller data.batch_size lower it",
                loading=measured.frozen_bytes + (4 * trainable if cfg.model.lora else 3 * 4 * max(net["params"] for net in nets)))


def frozen_role(name: str, pool: str, cfg: RunConfig, measured: peaks.Measured) -> Role:
    spec = getattr(cfg.cluster, pool)
    return Role(name, spec.replicas, spec.num_gpus, measured.frozen_params, 0, measured.frozen_bytes, 0, 0, measured.activations,
                f"a smaller cluster.{pool}.max_batch_size or a larger cluster.{pool}.num_gpus lowers it")


def roles(cfg: RunConfig, fake: bool = True) -> list[Role]:
    """Every role of the run, measured on the architectures its config names (fake tensors: nothing
    is allocated). Raises a UserError naming the source whose architecture cannot be had."""
    arch = architectures.architecture(cfg)
    return [
        trainer_role(cfg, peaks.trainer(arch, cfg, fake)),
        frozen_role("reference replica", "reference_pool", cfg, peaks.reference(arch, cfg, fake)),
        frozen_role("reward replica", "reward_pool", cfg, peaks.reward(arch, cfg, fake)),
    ]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(planned: list[Role], kinds: dict[str, float]) -> str:
    """The plan as a markdown table: one row a role, sizes in GiB, one column a GPU kind."""
    head = ["role", "processes", "GPUs each", "params (M)", "trainable (M)", "weights", "gradients", "optimiser",
            "activations", "loading", "total", *(f"{k} ({g:g} GiB)" for k, g in kinds.items())]
    rows = []
    for r in planned:
        fit = ["CPU" if not r.gpus else ("fits" if r.fits(g) else "no") for g in kinds.values()]
        rows.append([r.name, str(r.processes), f"{r.gpus:g}", f"{r.params / 1e6:.1f}", f"{r.trainable / 1e6:.1f}",
                     *(_gib(b) for b in (r.weights, r.gradients, r.states, r.activations, r.loading, r.total)), *fit])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def check(planned: list[Role], gpu_gib: float) -> None:
    """Raise DoesNotFit naming the first role that does not fit GPUs of gpu_gib, with its numbers."""
    for r in planned:
        if r.gpus and not r.fits(gpu_gib):
            raise DoesNotFit(
                f"{r.name}: needs {_gib(r.total)} GiB (weights {_gib(r.weights)}, gradients {_gib(r.gradients)}, "
                f"optimiser {_gib(r.states)}, activations {_gib(r.activations)}; {_gib(r.loading)} while loading) plus {_gib(headroom(r.total))} headroom, "
                f"but has {_gib(r.share(gpu_gib))} GiB ({min(r.gpus, 1):g} of a {gpu_gib:g} GiB GPU); {r.remedy}"
            )


def gpu_memory_here() -> float | None:
    """GiB of this machine's first GPU, if it has one."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None


def check_run(cfg: RunConfig, gpu_gib: float | None) -> str | None:
    """jobs/train.py's check before a run that asks for GPUs, against GPUs of gpu_gib (default: this
    machine's). Raises DoesNotFit; returns what was checked, or why nothing was (an architecture
    known only once downloaded does not stop a run that jobs/plan.py cannot plan)."""
    if not (cfg.cluster.trainer_gpus or cfg.cluster.reference_pool.num_gpus or cfg.cluster.reward_pool.num_gpus):
        return None  # CPU roles: nothing to fit
    gpu_gib = gpu_gib or gpu_memory_here()
    if gpu_gib is None:
        return "memory plan: not checked, no GPU is visible to this job; --gpu-memory GIB checks against GPUs of that size"
    try:
        planned = roles(cfg)
    except architectures.CannotPlan as e:
        return f"memory plan: not checked, {e.message}"
    check(planned, gpu_gib)
    return f"memory plan: every role fits {gpu_gib:g} GiB GPUs"
