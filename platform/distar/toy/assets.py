"""Where the shapes world's shipped models live, and how the `toy` source names them.

`jobs/build_toy_assets.py` writes them; the package ships them, so a fresh clone trains on the
toy world without training anything first.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
FOLDERS = {
    "reference": "reference",  # diffusers StableDiffusionPipeline folder
    "clip_score": "clip",  # mini-CLIP, transformers CLIPModel folder
    "pickscore": "pickscore",  # mini-PickScore, transformers CLIPModel folder
    "reader": "reader",  # attribute reader (config.json + model.safetensors)
}


def path(name: str, root: Path = ASSETS) -> Path:
    return root / FOLDERS[name]
