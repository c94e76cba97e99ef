"""Turn a model source from the config into a local folder.

A source is a local folder, an s3:// prefix (see distar.storage), a hub id (`org/name`, downloaded once into the hub cache), `toy`
(the shapes world's shipped models) or `tiny-random` (tiny untrained models of the requested
kind, built here for tests and smoke runs). The kind is a pipeline's model family or a reward name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from distar import storage
from distar.errors import UserError
from distar.models import tiny

TINY, TOY = "tiny-random", "toy"
TINY_BUILDERS = {
    "toy": tiny.build_sd15_pipeline,  # the toy family has SD1.5's structure
    "sd15": tiny.build_sd15_pipeline,
    "sdxl": tiny.build_sdxl_pipeline,
    "pickscore": tiny.build_clip,
    "clip_score": tiny.build_clip,
    "aesthetic": tiny.build_aesthetic,
}
TOY_ASSETS = {"toy": "reference", "sd15": "reference", "pickscore": "pickscore", "clip_score": "clip_score"}


class SourceError(UserError):
    """A model source that cannot be resolved; str() is the message to print."""


def resolve(source: str, kind: str, cache_dir: str | Path, field: str, fetch: bool = True) -> Path | None:
    """Local folder for `source`; `field` names the config entry in error messages. `kind` (a
    model family or a reward name) matters only for the built-in sources. With fetch=False it
    only checks what can be checked without building or downloading (and returns None for
    those): how a driver vets a config whose models load elsewhere."""
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
    if source == TOY:
        from distar.toy import assets

        if kind not in TOY_ASSETS:
            raise SourceError(f"{field}: the toy world has no {kind} model (it has: {', '.join(TOY_ASSETS)})")
        folder = assets.path(TOY_ASSETS[kind])
        if not folder.is_dir():
            raise SourceError(f"{field}: the toy assets are missing at {folder}; build them with python jobs/build_toy_assets.py")
        return folder
    if storage.is_s3(source):
        if not fetch:
            storage.objects(source, field)  # it exists and the credentials in use may read it
            return None
        return storage.fetch(source, field, Path(cache_dir))
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith(".") or path.exists() or source.count("/") != 1:
        raise SourceError(f"{field}: {source!r} is not a folder")
    if not fetch:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    except Exception as e:  # offline, unknown repo, gated: all one message for the user
        raise SourceError(f"{field}: could not fetch hub model {source!r}: {type(e).__name__}: {e}") from None
