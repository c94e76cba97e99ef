"""Prompt sources: a text file (one prompt a line) or a CSV or JSON with a `prompt` column, local or
at an s3:// URI (see distar.storage); `toy` (every prompt of the shapes world), `tiny-random`, or a
Hugging Face dataset (`hf://org/name[:split]`, with the `datasets` package and network access).

Prompts are read once at start (a bad source fails before any model loads) and served in a
seeded, epoch-wise shuffled order addressed by position, so a resumed run sees the same batches.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import torch

from distar import storage
from distar.errors import UserError
from distar.models import tiny

# Validation and evaluation draw their noise (and the shapes world its held-out prompts) from
# this seed, which no training run's seed reaches in practice: they never meet training's draws.
HELD_OUT_SEED = 30_000


class PromptError(UserError):
    """An unusable prompt source."""


def load_prompts(source: str, field: str = "data.prompts") -> list[str]:
    if source == "tiny-random":
        return list(tiny.PROMPTS)
    if source == "toy":
        from distar.toy import world

        return world.all_prompts()
    if storage.is_s3(source):
        return load_prompts(str(storage.fetch(source, field)), f"{field} ({source})")
    if source.startswith("hf://"):
        return _hf_prompts(source.removeprefix("hf://"), field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise PromptError(f"{field}: {source!r} is not a readable file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{field}: cannot read {source!r}: {e}") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as e:  # e.g. a field over the csv module's limit (128 KiB)
            raise PromptError(f"{field}: {source!r} is not a readable CSV: {e}") from None
        if not rows or "prompt" not in rows[0]:
            raise PromptError(f"{field}: {source!r} has no `prompt` column")
        prompts = [r["prompt"] for r in rows]
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptError(f"{field}: {source!r} is not valid JSON: {e}") from None
        except RecursionError:  # the decoder recurses once per bracket
            raise PromptError(f"{field}: {source!r}: JSON nested too deeply to be a list of prompts") from None
        rows = data.get("prompt", data.get("prompts")) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise PromptError(f"{field}: {source!r}: expected a list of prompts or of objects with a `prompt` key")
        prompts = [r.get("prompt") if isinstance(r, dict) else r for r in rows]
        if not all(isinstance(p, str) for p in prompts):
            raise PromptError(f"{field}: {source!r}: every entry needs a string prompt")
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise PromptError(f"{field}: {source!r} holds no prompts")
    return prompts


def _hf_prompts(name: str, field: str) -> list[str]:
    name, _, split = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise PromptError(f"{field}: hf://{name} needs the `datasets` package and network access (pip install datasets); "
                          "or pass a .txt/.csv/.json file of prompts") from None
    try:
        data = datasets.load_dataset(name, split=split or "test")
    except Exception as e:  # offline, unknown name, gated: one message
        raise PromptError(f"{field}: cannot load Hugging Face dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    column = next((c for c in ("prompt", "caption", "text") if c in data.column_names), None)
    if column is None:
        raise PromptError(f"{field}: Hugging Face dataset {name!r} has no prompt, caption or text column (it has {data.column_names})")
    prompts = [p.strip() for p in data[column] if isinstance(p, str) and p.strip()]
    if not prompts:
        raise PromptError(f"{field}: Hugging Face dataset {name!r} holds no prompts")
    return prompts


def spread(items: list, n: int) -> list:
    """`n` items evenly spaced over `items` (all of them when there are no more than n): a short
    evaluation still covers the whole source."""
    return list(items) if n >= len(items) else [items[i * len(items) // n] for i in range(n)]


def validation_prompts(prompts: str, validation: str | None, size: int) -> list[str]:
    """The run's fixed validation set: `size` prompts spread over the validation source (default:
    the training source)."""
    if size == 0:
        return []
    field = "data.validation_prompts" if validation else "data.prompts"
    return spread(load_prompts(validation or prompts, field), size)


class PromptSampler:
    """Batch k of a run is a pure function of (seed, k): resuming needs only the step."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int):
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed

    def batch(self, step: int) -> list[str]:
        n = len(self.prompts)
        positions = (divmod(i, n) for i in range(step * self.batch_size, (step + 1) * self.batch_size))
        return [self.prompts[_epoch_order(self.seed, n, epoch)[pos]] for epoch, pos in positions]


@functools.lru_cache(maxsize=4)  # a batch spans at most two epochs
def _epoch_order(seed: int, n: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
