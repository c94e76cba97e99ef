"""Which run an output folder belongs to: its lock, and the config each checkpoint was written by.

Starting a run whose folder holds checkpoints resumes it, in one process and on Ray alike. That
is right only for the same run: every checkpoint carries the config that wrote it, and a run whose
training differs (any field but those below: more steps is fine) is refused, naming the fields,
before anything starts. `--restart` deletes the folder's checkpoints and metrics instead. Two runs
never share a folder at once: the driver holds a lock on it for the whole run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

from distar import storage
from distar.config import RunConfig, to_yaml
from distar.errors import UserError

STATE_FILE = "trainer_state.json"  # the step a checkpoint holds; written last, by rank 0
CONFIG_FILE = "run_config.yaml"  # the config that wrote the checkpoint, beside its state
LOCK_FILE = ".distar.lock"
SWEEP_MARK = "sweep.json"  # a sweep's record of itself (sweep/runner.py): its folder is not a training run's
# Fields that do not shape the trained weights: where and how often a run reports, saves and
# looks, its length, its cluster's resources (trainer_workers does: it sets the global batch).
NOT_TRAINING = ("run.name", "run.steps", "run.output_dir", "run.storage_path", "run.log_every", "run.validate_every",
                "run.checkpoint_every", "run.max_consecutive_skips", "data.validation_prompts", "data.validation_size",
                "tracking.", "cluster.trainer_cpus", "cluster.trainer_gpus", "cluster.reward_pool.", "cluster.reference_pool.",
                "cluster.zero_stage", "cluster.max_failures")


class ResumeError(UserError):
    """An output folder that this run may not resume from or write to now."""


def write_state(folder: Path, state: dict, cfg: RunConfig) -> None:
    """A checkpoint's own files: the config first, the state (the mark of a complete one) last."""
    (folder / CONFIG_FILE).write_text(to_yaml(cfg))
    (folder / STATE_FILE).write_text(json.dumps(state))


def _flat(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def differences(stored: dict, cfg: RunConfig) -> list[str]:
    """`field (A in the checkpoint, B now)` for each field that shapes training and differs."""
    old, new = _flat(stored), _flat(cfg.model_dump(mode="json"))
    keys = [k for k in dict.fromkeys([*new, *old]) if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in NOT_TRAINING)]
    return [f"{k} ({old.get(k, 'unset')!r} in the checkpoint, {new.get(k, 'unset')!r} now)" for k in keys if old.get(k) != new.get(k)]


def latest(location: str) -> tuple[str, dict] | None:
    """The newest complete checkpoint under LOCATION/checkpoints (either runtime's) and its state."""
    import pyarrow.fs

    root, fs = storage.checkpoint_location(location if storage.is_s3(location) else str(Path(location).resolve()))
    fs, root = fs or pyarrow.fs.LocalFileSystem(), f"{root}/checkpoints"
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        state = f"{info.path}/{STATE_FILE}"
        if info.base_name.startswith("checkpoint_") and fs.get_file_info(state).is_file:
            with fs.open_input_stream(state) as f:
                found.append((json.loads(f.read())["step"], info.path, fs))
    if not found:
        return None
    step, path, fs = max(found, key=lambda item: item[0])
    config = f"{path}/{CONFIG_FILE}"
    if not fs.get_file_info(config).is_file:
        return path, {"step": step}
    with fs.open_input_stream(config) as f:
        return path, {"step": step, "config": yaml.safe_load(f.read().decode())}


def check_resumable(cfg: RunConfig) -> None:
    """Refuse (exit 2) a run whose folder holds checkpoints of a run that trains differently."""
    location = (cfg.run.storage_path or cfg.run.output_dir).rstrip("/")
    found = latest(location)
    if found is None:
        return
    path, state = found
    differ = differences(state["config"], cfg) if "config" in state else ["(its checkpoint records no config)"]
    if differ:
        raise ResumeError(f"run.output_dir: {location}/checkpoints holds a checkpoint at step {state['step']} of a run that trains "
                          f"differently: {'; '.join(differ)}. Give this run another run.output_dir, or start over with --restart "
                          "(deletes those checkpoints)")


def start_over(cfg: RunConfig) -> None:
    """Delete the folder's checkpoints and metrics file (--restart)."""
    location = cfg.run.storage_path or cfg.run.output_dir
    if storage.is_s3(location):
        root, fs = storage.checkpoint_location(location)
        fs.delete_dir_contents(f"{root}/checkpoints", missing_dir_ok=True)
    else:
        shutil.rmtree(Path(location) / "checkpoints", ignore_errors=True)
    Path(cfg.run.output_dir, "metrics.jsonl").unlink(missing_ok=True)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """The output folder, held by this process (a run or a sweep) until the block ends."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ResumeError(f"run.output_dir: {out} is in use by another run ({holder}); wait for it to end, "
                              "or give this run another run.output_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield


@contextlib.contextmanager
def claimed(cfg: RunConfig, restart: bool = False) -> Iterator[None]:
    """The output folder, locked for this run, checked (or emptied) for resuming."""
    out = Path(cfg.run.output_dir)
    with locked(out):
        if (out / SWEEP_MARK).is_file():
            raise ResumeError(f"run.output_dir: {out} holds a sweep; give this run another run.output_dir")
        if restart:
            start_over(cfg)
        else:
            check_resumable(cfg)
        yield
