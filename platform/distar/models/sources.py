"""Turn a model source from the config into a local folder.

A source is a local folder, a hub id (`org/name`, downloaded once into the hub cache), or
`tiny-random` (tiny untrained models of the requested kind, built here for tests and smoke runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from distar.errors import UserError
from distar.models import tiny

Kind = Literal["toy", "sd15", "sdxl", "clip"]  # a pipeline's model family, or a CLIP reward model
TINY = "tiny-random"
TINY_BUILDERS = {
    "toy": tiny.build_sd15_pipeline,  # the toy family has SD1.5's structure
    "sd15": tiny.build_sd15_pipeline,
    "sdxl": tiny.build_sdxl_pipeline,
    "clip": tiny.build_clip,
}


class SourceError(UserError):
    """A model source that cannot be resolved; str() is the message to print."""


def resolve(source: str, kind: Kind, cache_dir: str | Path, field: str) -> Path:
    """Local folder for `source`; `field` names the config entry in error messages. `kind` only
    matters for `tiny-random`, which builds a tiny model of that kind."""
    if source == TINY:
        folder = Path(cache_dir) / f"{TINY}-{kind}"
        if not folder.is_dir():
            TINY_BUILDERS[kind](folder)
        return folder
    if source.startswith("s3://"):
        raise SourceError(f"{field}: s3:// sources need distar.storage, which is not part of this build")
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith(".") or path.exists() or source.count("/") != 1:
        raise SourceError(f"{field}: {source!r} is not a folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    except Exception as e:  # offline, unknown repo, gated: all one message for the user
        raise SourceError(f"{field}: could not fetch hub model {source!r}: {type(e).__name__}: {e}") from None
