"""Where distar only needs weights (evaluation, promotion, serving), loading a registered
generator runs none of the code stored with it, and unpickles nothing: whoever can write the
registry's artifacts or move an alias cannot run code in those processes (docs/security.md)."""

import shutil

import pytest
import torch
from mlflow import MlflowClient

from distar.errors import UserError
from distar.tracking import registry, store

pytestmark = pytest.mark.slow  # trains a toy generator to register


@pytest.fixture(scope="module")
def registered(register_toy_generator, tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    version = register_toy_generator(uri, "tracking.registered_model=guarded", steps=1)
    client = MlflowClient(uri)
    folder = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location.removeprefix("file://")
    return uri, version, folder


def test_the_models_stored_code_does_not_run_when_distar_loads_it(registered, tmp_path):
    uri, version, folder = registered
    marker = tmp_path / "ran"
    with open(f"{folder}/pyfunc_code.py", "a") as f:  # what an attacker with write access to the artifacts would plant
        f.write(f"\nopen({str(marker)!r}, 'w').write('stored code ran')\n")
    loaded = registry.load("models:/guarded@candidate", store.resolve(uri))
    assert not marker.exists()
    assert loaded.version == version.version
    images = loaded.model.generate(["a small red circle on the left"], [3])
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def test_a_model_without_a_one_step_pipeline_is_refused_in_one_line(registered, tmp_path):
    _, _, folder = registered
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    (model / "MLmodel").write_text((model / "MLmodel").read_text().replace("path: artifacts/", "path: ../../"))
    with pytest.raises(UserError, match=r"not a distar generator \(no one-step pipeline folder at '\.\./\.\./"):
        registry.load(str(model))


def test_weights_load_from_safetensors_only(registered, tmp_path):
    _, _, folder = registered
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    pipeline = registry.pipeline_folder(model, str(model))
    unet = pipeline / "unet"
    torch.save({}, unet / "diffusion_pytorch_model.bin")  # pickled weights beside (here: instead of) the safetensors
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors"):
        registry.load(str(model))
