"""Print a run's memory plan: what each role holds on one GPU and whether it fits, before renting one.

    python jobs/plan.py [--config FILE] [--set a.b=VALUE ...] [--gpu-memory GIB]

For each role (trainer rank, reference replica, reward replica): parameters (all and trainable),
GiB of weights, gradients and optimiser states under the configured ZeRO stage and trainer
workers, the activation peak of one micro-batch, and whether it fits each GPU kind (or GPUs of
--gpu-memory GiB). Activation peaks come from running the roles' own code on the real
architectures with fake tensors: nothing is allocated, nothing is downloaded. The published
families' architectures (sd15, sdxl; PickScore's and the aesthetic predictor's CLIPs) ship with
distar; a local folder is read from its configs. A source whose architecture is not known here
exits with status 2 and one line. jobs/train.py makes the same check before a run that asks for GPUs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser("jobs/plan.py", __doc__)
    p.add_config()
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="plan for GPUs of this many GiB instead of the usual kinds")
    args = p.parse_args(argv)
    return cli.run(lambda: plan(args))


def plan(args) -> int:
    from distar.config import absolute_paths, load_config
    from distar.plan import fit

    cfg = absolute_paths(load_config(args.config, args.overrides))
    kinds = {"this GPU": args.gpu_memory} if args.gpu_memory else fit.GPU_KINDS
    planned = fit.roles(cfg)
    print(f"{cfg.run.name}: {cfg.model.family} at {cfg.model.resolution} px in {cfg.model.dtype}, ZeRO-{cfg.zero()} "
          f"over {cfg.cluster.trainer_workers} trainer workers, batch {cfg.data.batch_size}; sizes in GiB")
    print(fit.table(planned, kinds))
    if not any(r.gpus for r in planned):
        print("no role asks for a GPU (cluster.trainer_gpus and the pools' num_gpus are 0): these are CPU memory")
        return 0
    fits = [all(r.fits(g) or not r.gpus for r in planned) for g in kinds.values()]
    print("fits: " + (", ".join(k for k, ok in zip(kinds, fits) if ok) or "none of these GPUs"))
    return 0 if any(fits) else 1


if __name__ == "__main__":
    sys.exit(main())
