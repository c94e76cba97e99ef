"""Turn a model source from the config into a local folder (or, where the field allows, a file).

A source is a local folder, an s3:// prefix (see distar.storage), a hub id, `toy` (the shapes
world's shipped models) or `tiny-random` (tiny untrained models of the requested kind, built here
for tests and smoke runs). The kind is a pipeline's model family or a reward name.

A hub id is `org/name`, optionally `org/name/path/in/repo.safetensors` (one file, where the field
takes a state-dict file) and `@REVISION` (a branch, tag or commit). Hub repositories and s3://
prefixes are fetched for the files a loader reads (`needed`), not whole: published repositories
carry multi-GB root checkpoints, half-precision variants and other formats nobody here reads.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from distar import storage
from distar.config import BUILT_IN_SOURCES
from distar.errors import UserError
from distar.models import tiny

TINY, TOY = BUILT_IN_SOURCES
TINY_BUILDERS = {
    "toy": tiny.build_sd15_pipeline,  # the toy family has SD1.5's structure
    "sd15": tiny.build_sd15_pipeline,
    "sdxl": tiny.build_sdxl_pipeline,
    "pickscore": tiny.build_clip,
    "clip_score": tiny.build_clip,
    "aesthetic": tiny.build_aesthetic,
}
TOY_ASSETS = {"toy": "reference", "sd15": "reference", "pickscore": "pickscore", "clip_score": "clip_score"}

# What the one-step pipeline (and DI*'s parts) load; a pipeline's other components (safety
# checker, feature extractor, image encoder) are never fetched or exported.
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt")
FILE_KINDS = {"unet"}  # the files= kinds whose source may be a single state-dict file
_TOKENIZER = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json"]
_PROCESSOR = [*_TOKENIZER, "preprocessor_config.json", "processor_config.json", "config.json"]
_DIFFUSERS, _TRANSFORMERS = {"safetensors": "diffusion_pytorch_model", "bin": "diffusion_pytorch_model"}, {"safetensors": "model", "bin": "pytorch_model"}
# kind -> (files besides weights, [(folder, weight names)]): each folder's weights in one format.
_LAYOUTS = {
    "pipeline": (["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                  "scheduler/scheduler_config.json", *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in _TOKENIZER)],
                 [("unet", _DIFFUSERS), ("vae", _DIFFUSERS), ("text_encoder", _TRANSFORMERS), ("text_encoder_2", _TRANSFORMERS)]),
    "unet": (["config.json", "unet/config.json"], [("", _DIFFUSERS), ("unet", _DIFFUSERS)]),  # a UNet folder, or a pipeline's unet/
    "clip": (_PROCESSOR, [("", _TRANSFORMERS)]),
    "processor": (_PROCESSOR, []),  # a tokenizer and preprocessing config without the weights beside them
    "aesthetic": ([*_PROCESSOR, "aesthetic_head.safetensors", "*.pth"], [("", _TRANSFORMERS)]),
    "hpsv2": (["*.pt", "open_clip_config.json"], []),
    "image_reward": (["ImageReward.pt", "med_config.json"], []),
}
_ALIASES = {"toy": "pipeline", "sd15": "pipeline", "sdxl": "pipeline", "pickscore": "clip", "clip_score": "clip"}
_HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[^@]+))?(?:@(?P<revision>[^@]+))?")


class SourceError(UserError):
    """A model source that cannot be resolved; str() is the message to print."""


def needed(kind: str, weights: str = "safetensors") -> list[str]:
    """fnmatch patterns (as huggingface_hub applies them) of the files a loader of `kind` reads (a
    model family, a reward name, "unet" or "processor"), with the weights as non-variant
    `weights` files ("safetensors" or "bin"), sharded or not."""
    other, folders = _LAYOUTS[_ALIASES.get(kind, kind)]
    return [*other, *(f"{folder}/{p}" if folder else p for folder, stems in folders for p in _weight_names(stems[weights], weights))]


def select(names: Iterable[str], kind: str) -> list[str]:
    """Of a folder's files (posix paths relative to it), those `needed`: safetensors weights, and
    bin weights only for a part (a folder with a config.json) that has no safetensors."""
    names, patterns = list(names), needed(kind)
    chosen = [n for n in names if _matches(n, patterns)]
    fallback = _bin_weights(kind, _weightless(chosen, kind))
    return chosen + [n for n in names if n not in chosen and _matches(n, fallback)]


def _weight_names(stem: str, suffix: str) -> list[str]:
    return [f"{stem}.{suffix}", f"{stem}-*-of-*.{suffix}", f"{stem}.{suffix}.index.json"]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _folder(name: str) -> str:
    parent = PurePosixPath(name).parent.as_posix()
    return "" if parent == "." else parent


def _weightless(names: list[str], kind: str) -> set[str]:
    """The parts among `names` (folders with a config.json) that hold no safetensors weights."""
    bins = needed(kind, "bin")
    weights = [p for p in needed(kind) if p not in bins]
    parts = {_folder(n) for n in names if PurePosixPath(n).name == "config.json"}
    return parts - {_folder(n) for n in names if _matches(n, weights)}


def _bin_weights(kind: str, folders: set[str]) -> list[str]:
    """The bin weight patterns of these parts."""
    safetensors = needed(kind)
    return [p for p in needed(kind, "bin") if p not in safetensors and _folder(p) in folders]


def resolve(source: str, kind: str, cache_dir: str | Path, field: str, fetch: bool = True, files: str | None = None) -> Path | None:
    """Local folder for `source`; `field` names the config entry in error messages. `kind` (a
    model family or a reward name) picks the built-in model; `files` (default: kind) says which
    files a fetched folder needs (see `needed`) and, for "unet", allows a state-dict file. With
    fetch=False it only checks what can be checked without building or downloading (and returns
    None for those): how a driver vets a config whose models load elsewhere."""
    files = files or kind
    if source in (TINY, TOY):
        return _built_in(source, kind, cache_dir, field, fetch)
    if storage.is_s3(source):
        if not fetch:
            storage.objects(source, field)  # it exists and the credentials in use may read it
            return None
        return storage.fetch(source, field, Path(cache_dir), keep=lambda names: select(names, files))
    path = Path(source).expanduser()
    takes_file = files in FILE_KINDS
    what = "folder or state-dict file" if takes_file else "folder"
    if path.is_dir() or (path.is_file() and takes_file and path.suffix in STATE_DICT_SUFFIXES):
        return path
    hub = _HUB_ID.fullmatch(source)
    if path.exists() or path.is_absolute() or source.startswith((".", "~")) or hub is None:
        raise SourceError(f"{field}: {source!r} is not a {what}" + (f" ({', '.join(STATE_DICT_SUFFIXES)})" if takes_file and path.is_file() else ""))
    repo, file, revision = hub["repo"], hub["file"], hub["revision"]
    if file is not None and not (takes_file and file.endswith(STATE_DICT_SUFFIXES)):
        raise SourceError(f"{field}: {source!r} is not a {what}" + ("" if takes_file else "; it takes a hub repository id, org/name[@REVISION]"))
    if not fetch:
        return None
    return _hub(repo, file, revision, files, field, source)


def _built_in(source: str, kind: str, cache_dir: str | Path, field: str, fetch: bool) -> Path | None:
    if source == TINY:
        if kind not in TINY_BUILDERS:
            raise SourceError(f"{field}: there is no tiny-random {kind} model (available: {', '.join(TINY_BUILDERS)})")
        folder = Path(cache_dir) / f"{TINY}-{kind}"
        if not fetch:
            return None
        if not folder.is_dir():  # built aside and renamed: processes sharing the cache never see half a model
            partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
            TINY_BUILDERS[kind](partial)
            try:
                partial.rename(folder)
            except OSError:  # another process got there first; its model is the same (seeded)
                shutil.rmtree(partial, ignore_errors=True)
        return folder
    from distar.toy import assets

    if kind not in TOY_ASSETS:
        raise SourceError(f"{field}: the toy world has no {kind} model (it has: {', '.join(TOY_ASSETS)})")
    folder = assets.path(TOY_ASSETS[kind])
    if not folder.is_dir():
        raise SourceError(f"{field}: the toy assets are missing at {folder}; build them with python jobs/build_toy_assets.py")
    return folder


def _hub(repo: str, file: str | None, revision: str | None, files: str, field: str, source: str) -> Path:
    """The hub cache's copy, at `revision` (default: main). A folder is fetched in two passes with
    the same patterns online and offline: safetensors first, then bin weights for the parts that
    had none (the hub's listing is not at hand offline, the cache's snapshot is)."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if file is not None:
            return Path(hf_hub_download(repo, file, revision=revision))
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=needed(files)))
        present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        more = _bin_weights(files, _weightless([n for n in present if _matches(n, needed(files))], files))
        if more:
            snapshot_download(repo, revision=revision, allow_patterns=more)
        return folder
    except Exception as e:  # offline, unknown repo or revision, gated: all one message for the user
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the hub said
        raise SourceError(f"{field}: could not fetch hub model {source!r}: {reason}") from None
