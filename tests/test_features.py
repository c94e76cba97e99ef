"""Feature networks for the ref/* distribution metrics on real images: tiny DINOv2 and CLIP models
built from configs and saved, loaded through the code that loads published ones; and an
evaluation that compares a model with the reference on them."""

import math

import pytest
import torch

from distar.errors import UserError
from distar.evaluation import features as feature_networks
from distar.models import sources


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_dinov2_and_clip_give_one_vector_an_image_the_same_for_the_same_image(dinov2, tmp_path):
    clip = sources.resolve("tiny-random", "pickscore", tmp_path, "--features")  # a whole CLIP model: its vision tower is used
    for folder, kind, size in ((dinov2, "dinov2", 28), (clip, "clip", None)):
        net = feature_networks.load_features(str(folder))
        assert net.kind == kind and (size is None or net.size == size)
        x = images(5, 0)
        a, b = net(x), net(x[[2, 0, 1, 4, 3]])
        assert a.shape[0] == 5 and a.ndim == 2 and a.dtype == torch.float32
        assert torch.allclose(a[[2, 0, 1, 4, 3]], b, atol=1e-5)  # per image: batch order does not matter
        assert not torch.allclose(a[0], a[1])


def test_a_source_that_is_not_a_feature_network_is_refused_by_name(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match=r"^error: --features: .*bert holds a bert model; distribution features come from a dinov2 or clip model$"):
        feature_networks.load_features(str(tmp_path / "bert"))
    with pytest.raises(UserError, match=r"^error: --features: /no/such/folder: not a transformers model folder or hub id"):
        feature_networks.load_features("/no/such/folder")


def test_an_evaluation_with_features_compares_each_model_with_the_reference(dinov2, tmp_path, monkeypatch):
    """The reference (tiny-random) evaluated beside itself as a model folder: the same images, so
    FID is 0 and precision and recall 1; with too few prompts, or no reference, it is refused."""
    from distar import evaluation

    monkeypatch.setenv("DISTAR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "prompts.txt").write_text("\n".join(f"a photo of thing {i}" for i in range(64)) + "\n")
    reference = sources.resolve("tiny-random", "sd15", tmp_path / "cache", "--reference")
    common = dict(prompts=str(tmp_path / "prompts.txt"), steps=2, diversity_prompts=0, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                  overrides=["model.family=sd15", "rewards=[{name: clip_score, source: tiny-random}]"], features=str(dinov2))
    report = evaluation.run(evaluation.Request(**common, reference="tiny-random", models=[str(reference)]), log=lambda line: None)
    metrics = report.subjects[1].metrics
    assert metrics["ref/fid"] == pytest.approx(0, abs=1e-6) and metrics["ref/precision"] == metrics["ref/recall"] == 1.0
    assert "ref/fid" not in report.subjects[0].metrics and "FID (ref)" in report.table
    with pytest.raises(UserError, match=r"^error: --features: FID needs at least 64 images a set, and 8 prompts give 8"):
        evaluation.run(evaluation.Request(**common, reference="tiny-random", models=[str(reference)], limit=8), log=lambda line: None)
    with pytest.raises(UserError, match=r"^error: --features: the distribution metrics compare each model's images with the reference's samples"):
        evaluation.run(evaluation.Request(**common, models=[str(reference)]), log=lambda line: None)


@pytest.mark.slow
def test_a_run_validates_against_the_references_samples_on_dinov2(dinov2, tmp_path, monkeypatch):
    """data.validation_features names a DINOv2 folder: each validation of a real-image run (tiny SD1.5)
    reports val/ref/* against the reference's samples drawn once at its start, on those features."""
    from distar.config import load_config
    from distar.evaluation.subjects import reference_samples
    from distar.run.in_process import run_loop
    from distar.run.validation import Validation, metric_names

    monkeypatch.setenv("DISTAR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "prompts.txt").write_text("\n".join(f"a photo of thing {i}" for i in range(8)) + "\n")
    cfg = load_config(None, ["model.family=sd15", "model.reference=tiny-random", f"data.prompts={tmp_path / 'prompts.txt'}", "data.batch_size=2",
                             "data.validation_size=4", "rewards=[{name: clip_score, source: tiny-random}]", f"data.validation_features={dinov2}"])
    run = run_loop(cfg)
    validation = Validation(cfg, run.parts, run.latent_shape, run.score_rewards)
    values = validation(run.trainer.generator)
    assert sorted(values) == sorted(metric_names(cfg)) == ["val/ref/coverage", "val/ref/density", "val/ref/precision", "val/ref/recall", "val/reward/clip_score"]
    net = feature_networks.load_features(str(dinov2))
    assert validation.versus.real == pytest.approx(net(reference_samples(cfg, validation.prompts)), abs=1e-5)
    assert validation.versus.against(reference_samples(cfg, validation.prompts))["ref/recall"] == 1.0
    assert all(math.isfinite(v) for v in values.values()) and values == validation(run.trainer.generator)  # the same noise each time
