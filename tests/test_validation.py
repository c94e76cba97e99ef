"""Validation: a fixed prompt set with noise training never draws, scored through the same reward
worker that trains (the pool on Ray) and, in the shapes world, by the reader."""

import math

import pytest
import torch

from distar.config import load_config
from distar.data import HELD_OUT_SEED, validation_prompts
from distar.evaluation.judges import load_judges
from distar.run import in_process
from distar.run.record import one_step_latents
from distar.run.validation import Validation, metric_names, unreported


def test_the_validation_set_is_spread_over_its_source(tmp_path):
    assert validation_prompts("toy", None, 4) == validation_prompts("toy", None, 4)  # fixed
    assert len(set(validation_prompts("toy", None, 32))) == 32
    (tmp_path / "val.txt").write_text("one\ntwo\nthree\n")
    assert validation_prompts("toy", str(tmp_path / "val.txt"), 32) == ["one", "two", "three"]
    assert validation_prompts("toy", None, 0) == []


def test_metric_names_follow_the_rewards_and_the_world(tmp_path):
    cfg = load_config()
    assert metric_names(cfg)[:2] == ["val/reward/pickscore", "val/reward/clip_score"]
    assert {"val/pref", "val/acc/all", "val/acc/color", "val/world/misplaced", "val/world/off_world"} <= set(metric_names(cfg))
    (tmp_path / "val.txt").write_text("a photo of a cat\n")
    assert metric_names(load_config(None, [f"data.validation_prompts={tmp_path / 'val.txt'}"])) == ["val/reward/pickscore", "val/reward/clip_score"]
    assert metric_names(load_config(None, ["data.validation_size=0"])) == []


def test_validation_scores_what_the_judges_score_directly():
    """Rewards through the reward worker (latents in, chunked like the pools' batches) equal the
    reward models on the decoded images; the reader's values come with them."""
    cfg = load_config(None, ["data.validation_size=10", "data.batch_size=4"])
    run = in_process.run_loop(cfg)
    validation = Validation(cfg, run.parts, run.latent_shape, run.score_rewards)
    values = validation(run.trainer.generator)
    prompts = validation_prompts(cfg.data.prompts, None, 10)
    x0 = one_step_latents(run.generator, run.parts.conditioner, run.latent_shape, prompts, HELD_OUT_SEED, 10)
    with torch.no_grad():
        direct = load_judges(cfg, prompts).score(run.parts.decode(x0), prompts)
    assert sorted(values) == sorted(metric_names(cfg))
    for key, value in direct.items():
        assert values[f"val/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert all(math.isfinite(v) for v in values.values())


def test_validation_features_add_the_comparison_with_the_reference():
    cfg = load_config(None, ["data.validation_features=reader"])
    against = [n for n in metric_names(cfg) if n.startswith("val/ref/")]
    assert against == ["val/ref/precision", "val/ref/recall", "val/ref/density", "val/ref/coverage"]  # 32 prompts: no FID
    assert unreported(cfg, "val/ref/fid") == "val/ref/fid needs at least 64 validation images; data.validation_size is 32"
    assert "val/ref/fid" in metric_names(load_config(None, ["data.validation_features=reader", "data.validation_size=64"]))
    assert not [n for n in metric_names(load_config()) if n.startswith("val/ref/")]


@pytest.mark.slow
def test_validation_compares_the_generator_with_the_references_samples():
    """val/ref/* are the distribution metrics between the generator's validation images and the
    reference's 50-step samples of the same prompts, on the reader's features; the reference's
    samples compared with themselves are the identical set."""
    from distar.evaluation import distribution
    from distar.evaluation.judges import load_reader
    from distar.evaluation.subjects import reference_samples

    cfg = load_config(None, ["data.validation_size=8", "data.batch_size=4", "data.validation_features=reader"])
    run = in_process.run_loop(cfg)
    validation = Validation(cfg, run.parts, run.latent_shape, run.score_rewards)
    values = validation(run.trainer.generator)
    assert sorted(values) == sorted(metric_names(cfg)) and all(math.isfinite(v) for v in values.values())
    reader, samples = load_reader(validation.prompts).features, reference_samples(cfg, validation.prompts)
    x0 = one_step_latents(run.generator, run.parts.conditioner, run.latent_shape, validation.prompts, HELD_OUT_SEED, 8)
    with torch.no_grad():
        direct = distribution.compare(reader(samples), reader(run.parts.decode(x0)))
    assert {k: values[f"val/ref/{k}"] for k in direct} == pytest.approx(direct, rel=1e-5, abs=1e-6)
    itself = validation.versus.against(samples)
    assert itself["ref/precision"] == itself["ref/recall"] == 1.0 and values["val/ref/recall"] < 1.0  # the untrained one-step generator is not there yet


@pytest.mark.slow
def test_an_in_process_run_validates_before_every_n_updates_and_at_the_end(tmp_path, mlflow_client):

    from distar.tracking.runs import TrainingRun

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.steps=5", "run.validate_every=2", "data.batch_size=2",
                             "data.validation_size=4", f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db"])
    lines = []
    with TrainingRun(cfg) as tracked:
        in_process.train(cfg, tracked.target, log=lines.append)
        tracked.finish()
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(tracked.run_id, "val/pref")] == [0, 2, 4, 5]
    assert [m.step for m in client.get_metric_history(tracked.run_id, "val/reward/pickscore")] == [0, 2, 4, 5]
    assert sum(line.startswith("validation at step") for line in lines) == 3  # the start is logged to MLflow only
