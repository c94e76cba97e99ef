"""Every role in one process: the single-process baseline, and the engine of tests and smoke runs.

The pools are a RewardWorker and a ReferenceWorker called directly, the optimisers torch's AdamW.
Checkpoints go where a run on Ray keeps its own (run.storage_path, else run.output_dir, under
checkpoints/; a folder or s3://), the last two are kept, and starting the same run again resumes
from the latest: the next steps' losses are those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from distar import storage
from distar.config import OptimizerSpec, RunConfig
from distar.errors import UserError
from distar.roles.trainer import Later, Update
from distar.run import build, guard
from distar.run.ema import GeneratorEMA, with_average
from distar.run.loop import RunLoop
from distar.run.resume import STATE_FILE, write_state
from distar.run.runtime import Outcome, Progress
from distar.tracking.runs import RunTarget

KEEP = 2
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints


class TorchUpdate:
    """AdamW with global grad-norm clipping on one network."""

    def __init__(self, module: nn.Module, spec: OptimizerSpec, grad_clip: float | None):
        self.module, self.clip = module, grad_clip if grad_clip is not None else float("inf")
        self.params = [p for p in module.parameters() if p.requires_grad]  # with model.lora, the adapters alone
        self.opt = torch.optim.AdamW(self.params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)

    def __call__(self, loss: Tensor) -> float:
        """Back-propagate the loss and step; returns the gradient norm before clipping. A
        non-finite norm (a finite loss can still have one) skips the step, as DeepSpeed does."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip).item()
        if math.isfinite(norm):
            self.opt.step()
        return norm


class Checkpoints:
    """`checkpoint_<step>` folders under LOCATION/checkpoints, on a disk or in S3 (through the same
    pyarrow filesystem Ray Train uses), the last KEEP of them kept."""

    def __init__(self, location: str):
        import pyarrow.fs

        root, fs = storage.checkpoint_location(location if storage.is_s3(location) else str(Path(location).resolve()))
        self.fs, self.root = fs or pyarrow.fs.LocalFileSystem(), f"{root}/checkpoints"

    def _listed(self) -> list[str]:
        import pyarrow.fs

        found = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        return [f.base_name for f in found]

    def complete(self) -> list[str]:
        """This runtime's complete checkpoints, oldest first."""
        names = sorted(n for n in self._listed() if re.fullmatch(r"checkpoint_\d+", n))
        return [n for n in names if self.fs.get_file_info(f"{self.root}/{n}/{STATE_FILE}").is_file]

    def holds_ray_checkpoints(self) -> bool:
        return RAY_SNAPSHOT in self._listed()

    def write(self, local: Path, step: int) -> None:
        """Copy a checkpoint folder in, its state file last, and drop all but the last KEEP."""
        import pyarrow.fs

        target = f"{self.root}/checkpoint_{step:06d}"
        for path in sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == STATE_FILE):
            name = path.relative_to(local).as_posix()
            self.fs.create_dir(f"{target}/{name}".rsplit("/", 1)[0])  # engines write a folder each (tests/zero3_here.py)
            pyarrow.fs.copy_files(str(path), f"{target}/{name}", destination_filesystem=self.fs)
        for old in self.complete()[:-KEEP]:
            self.fs.delete_dir(f"{self.root}/{old}")

    def read(self, name: str, local: Path) -> None:
        import pyarrow.fs

        pyarrow.fs.copy_files(f"{self.root}/{name}", str(local), source_filesystem=self.fs)


class InProcess:
    """The runtime of one process (distar.run.runtime.Runtime)."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.checkpoints = Checkpoints(cfg.run.storage_path or cfg.run.output_dir)
        self.networks: dict[str, TorchUpdate] = {}
        self.ema: GeneratorEMA | None = None

    def pools(self, cfg: RunConfig, parts):
        rewards, reference = build.reward_worker(cfg), build.reference_worker(cfg, parts)
        return (lambda request: Later(lambda: rewards(request))), (lambda request: Later(lambda: reference(request)))

    def updates(self, generator: nn.Module, fake: nn.Module, timing=None) -> tuple[Update, Update]:
        o = self.cfg.optim
        self.networks = {"generator": TorchUpdate(generator, o.generator, o.grad_clip), "fake_score": TorchUpdate(fake, o.fake_score, o.grad_clip)}
        self.ema = GeneratorEMA.of(generator, o.ema_decay)
        return with_average(self.networks["generator"], self.ema), self.networks["fake_score"]

    @staticmethod
    def all_ranks_agree(ok: bool) -> bool:
        return ok

    @staticmethod
    def gathered(module: nn.Module):
        return contextlib.nullcontext()

    def restore(self) -> Progress | None:
        if self.checkpoints.holds_ray_checkpoints():
            raise UserError(f"{self.checkpoints.root} holds the checkpoints of a run on Ray; resume it on Ray (without --in-process), "
                            "or give this run another run.output_dir")
        names = self.checkpoints.complete()
        if not names:
            return None
        with tempfile.TemporaryDirectory() as d:
            self.checkpoints.read(names[-1], Path(d))
            self._read(Path(d))
            return Progress(**json.loads((Path(d) / STATE_FILE).read_text()))

    def save(self, progress: Progress, report: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as d:
            self._write(Path(d))
            write_state(Path(d), dataclasses.asdict(progress), self.cfg)
            self.checkpoints.write(Path(d), progress.step)

    def snapshot(self) -> None:
        guard.folder(self.cfg).mkdir(parents=True, exist_ok=True)
        self._write(guard.folder(self.cfg))

    def rewind(self) -> None:
        self._read(guard.folder(self.cfg))

    def _write(self, folder: Path) -> None:
        """The trainable parameters only: with model.lora, the adapters and not the frozen base they share."""
        for name, update in self.networks.items():
            trained = {k: p.detach() for k, p in update.module.named_parameters() if p.requires_grad}
            torch.save({"module": trained, "optimizer": update.opt.state_dict()}, folder / f"{name}.pt")
        if self.ema:
            self.ema.save(folder, self.rank)

    def _read(self, folder: Path) -> None:
        for name, update in self.networks.items():
            state = torch.load(folder / f"{name}.pt", weights_only=True)
            missing, unexpected = update.module.load_state_dict(state["module"], strict=False)
            if unexpected or any(p.requires_grad for k, p in update.module.named_parameters() if k in missing):
                raise UserError(f"{folder} holds other parameters of {name} than this run trains (model.lora changed?): "
                                f"{len(unexpected)} unknown, {len(missing)} not in it")
            update.opt.load_state_dict(state["optimizer"])
        if self.ema:
            self.ema.load(folder, self.rank)

    def report(self, report: dict[str, float]) -> None:
        """Nobody watches an in-process run but its records."""

    def step_done(self, seconds: float, samples: int, values: dict[str, float], parts: dict[str, dict[str, float]], skipped_total: int) -> None:
        """Its step line and records say it all."""


def run_loop(cfg: RunConfig, log=print) -> RunLoop:
    """The run loop of `cfg` in this process, set up (every source resolved and loaded) but not started."""
    return RunLoop(cfg, InProcess(cfg), log)


def train(cfg: RunConfig, tracking: RunTarget | None = None, log=print) -> Outcome:
    """Run cfg.run.steps updates in this process (resuming its checkpoints); see RunLoop.run."""
    return run_loop(cfg, log).run(tracking)
