"""Measuring one model: its images' scores by the judges, diversity, time per image and peak memory."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Sequence

from distar.evaluation.judges import Judges
from distar.evaluation.runs import PREFIX, RATIO_PREFIX, EvaluationRuns
from distar.evaluation.subjects import Subject
from distar.evaluation.table import fmt, markdown


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


def measure_model(model, prompts: list[str], seed: int, judges: Judges, diversity_prompts: int = 16, device: str = "cpu") -> tuple[dict[str, float], object]:
    """Sample `model` (an Sampler) on `prompts` with seeds seed.. seed+N-1 and measure it (see
    distar.evaluation's docstring; no diversity with diversity_prompts 0). Returns the metrics
    and the images."""
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


class AgainstReference:
    """Each model's images against the reference's samples (the reference is measured first), on
    a feature network: `ref/precision|recall|density|coverage`, and `ref/fid` from FID_MIN images."""

    def __init__(self, features: Callable, reference: Subject | None = None):
        self.features, self.reference, self.real = features, reference, None

    def __call__(self, subject: Subject, images) -> dict[str, float]:
        if subject is self.reference:
            self.remember(images)
            return {}
        return self.against(images)

    def remember(self, reference_images) -> None:
        self.real = self.features(reference_images)

    def against(self, images) -> dict[str, float]:
        from distar.evaluation import distribution

        return {f"ref/{k}": v for k, v in distribution.compare(self.real, self.features(images)).items()}


def measure_all(subjects: list[Subject], baseline: Subject, prompts: list[str], seed: int, judges: Judges, runs: EvaluationRuns | None,
             notes: Sequence[str] = (), diversity_prompts: int = 16, device: str = "cpu", log: Callable[[str], None] = print,
             versus: AgainstReference | None = None) -> str:
    """Measure every subject in turn (one model in memory at a time), then the ratios against
    `baseline`; log it all when `runs` is given. Returns the markdown table."""
    for s in subjects:
        log(f"evaluating {s.label} ...")
        start = time.perf_counter()
        model = s.open()
        model.pipe.to(device)
        if model.t_star is None:
            s.diffusion = (model.steps, model.cfg)
        s.metrics, images = measure_model(model, prompts, seed, judges, diversity_prompts, device)
        del model
        if versus is not None:
            s.metrics.update(versus(s, images))
        if runs is not None:
            runs.start(s)
            runs.log_metrics(s, {PREFIX + k: v for k, v in s.metrics.items()})
            runs.log_images(s, images)
        log(f"  done in {time.perf_counter() - start:.1f} s: " + ", ".join(f"{k} {fmt(v)}" for k, v in s.metrics.items()))
        del images
        release_freed_memory()
    for s in subjects:
        s.ratios = ratios(s.metrics, baseline.metrics)
        if runs is not None:
            runs.log_metrics(s, {RATIO_PREFIX + k: v for k, v in s.ratios.items()})
    table = markdown(subjects, baseline, notes)
    if runs is not None:
        runs.finish(subjects, table)
    return table
