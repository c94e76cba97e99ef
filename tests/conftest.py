import os

# Tests never reach a model hub: every model is built from a config and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and OpenMP spin-waits slow them ~100x when
# another process (a Ray worker, a second test) holds the other core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from distar.models import tiny  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A tiny random SD1.5-structured diffusers folder, built once per session."""
    return tiny.build_sd15_pipeline(tmp_path_factory.mktemp("models") / "sd15")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel folder (PickScore / CLIP-score architecture)."""
    return tiny.build_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Built-in sources (`tiny-random`) materialise under the test's own folder."""
    monkeypatch.setenv("DISTAR_CACHE", str(tmp_path / "cache"))
