"""Measuring one model: its images' rewards and reader verdict, diversity, time and peak memory."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

ACCURACIES = ("size", "color", "shape", "position", "all")


def memory_method(device: str) -> str:
    if str(device).startswith("cuda"):
        return "CUDA max_memory_allocated while generating (weights included)"
    return "peak process RSS rise above the RSS before generating (weights excluded), sampled every 2 ms"


def release_freed_memory() -> None:
    """Hand memory freed by earlier models back to the OS, so an RSS rise is this model's own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement is just noisier
        pass


class PeakMemory:
    """Context manager: `.mb` is the peak memory of what ran inside it (see `memory_method`)."""

    def __init__(self, device: str = "cpu", interval: float = 0.002):
        self.device, self.interval, self.mb = str(device), interval, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        release_freed_memory()
        self._process, self._stop = psutil.Process(os.getpid()), threading.Event()
        self._base = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._peak = max(self._peak, self._process.memory_info().rss)
        self._stop.set()
        self._thread.join()
        self.mb = max(0, self._peak - self._base) / 2**20


def diversity(first, second) -> float:
    """Mean over pairs of the RMS pixel distance between first[i] and second[i] ([K, 3, H, W] in [0, 1])."""
    if len(first) == 0:
        return float("nan")
    d = (first.float() - second.float()).pow(2).flatten(1).mean(1).sqrt()
    return float(d.mean())


@dataclass
class Judges:
    """What scores the images: reward models by name, and the shapes-world reader (or None)."""

    rewards: dict[str, Callable] = field(default_factory=dict)
    reader: object | None = None
    device: str = "cpu"
    batch: int = 64
    reader_size: int = 32  # distar.toy.world.SIZE

    def score(self, images, prompts: list[str]) -> dict[str, float]:
        import torch

        out: dict[str, float] = {}
        with torch.no_grad():
            for name, reward in self.rewards.items():
                scores = [reward(images[i : i + self.batch].to(self.device), prompts[i : i + self.batch]).float().cpu()
                          for i in range(0, len(prompts), self.batch)]
                out[f"reward/{name}"] = float(torch.cat(scores).mean())
        if self.reader is not None and tuple(images.shape[-2:]) == (self.reader_size, self.reader_size):  # the reader reads 32x32 only
            reading = self.reader.read(images.cpu())
            out["pref"] = float(np.mean(reading.pref))
            out.update({f"acc/{k}": v for k, v in reading.accuracy(prompts).items()})
        return out


def load_reader(prompts: Sequence[str]):
    """The shapes-world reader when every prompt is the shapes world's, else None."""
    from distar.toy import world

    if not prompts or not all(world.is_world_prompt(p) for p in prompts):
        return None
    from distar.toy import assets
    from distar.toy.reader import Reader

    return Reader.load(assets.path("reader"))


def load_judges(cfg, prompts: Sequence[str], device: str = "cpu") -> Judges:
    """The run config's reward models (on `device`), and the toy reader when the prompts are the
    shapes world's."""
    from distar.models import sources
    from distar.rewards import load_reward
    from distar.storage import cache_dir

    rewards = {r.name: load_reward(r.name, sources.resolve(r.source, r.name, cache_dir(), f"rewards.{i}.source")).to(device).eval()
               for i, r in enumerate(cfg.rewards)}
    return Judges(rewards, load_reader(prompts), device)


def measure_model(model, prompts: list[str], seed: int, judges: Judges, diversity_prompts: int = 16, device: str = "cpu") -> tuple[dict[str, float], object]:
    """Sample `model` (an ImageModel) on `prompts` with seeds seed.. seed+N-1 and measure it (see
    the module docstring). Returns the metrics and the images."""
    import torch

    n = len(prompts)
    seeds = list(range(seed, seed + n))
    model.generate(prompts[:2], seeds[:2])  # warm-up: first calls allocate and pick kernels
    with PeakMemory(device) as memory:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        images = model.generate(prompts, seeds)  # returned on the CPU: synchronised
        seconds = time.perf_counter() - start
    k = min(diversity_prompts, n)
    metrics = judges.score(images, prompts)
    if k > 0:
        others = model.generate(prompts[:k], list(range(seed + n, seed + n + k)))
        metrics["diversity"] = diversity(images[:k], others)
    metrics.update(seconds_per_image=seconds / n, peak_memory_mb=memory.mb, unet_calls=float(model.network_calls))
    return metrics, images


def ratios(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """metric / baseline metric, for every metric both have with a finite, non-zero baseline."""
    out = {}
    for key, value in metrics.items():
        base = baseline.get(key)
        if base is not None and math.isfinite(base) and base != 0 and math.isfinite(value):
            out[key] = value / base
    return out
