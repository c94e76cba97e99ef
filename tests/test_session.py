"""The driver's preparation of a config for processes that run elsewhere (no Ray needed)."""

import os

from distar.cluster import engines  # noqa: F401  (imported for the check below: it configures nothing)
from distar.cluster.session import TRAIN_CONTROLLER, cpus_needed, set_train_controller_env, worker_env
from distar.config import absolute_paths, load_config


def test_local_paths_become_absolute_and_built_in_names_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    (tmp_path / "held_out.txt").write_text("another prompt\n")
    (tmp_path / "toy").mkdir()  # a folder named like a built-in source must not capture it
    cfg = absolute_paths(load_config(None, ["data.prompts=prompts.txt", "data.validation_prompts=held_out.txt", "run.output_dir=runs/x"]))
    assert cfg.data.prompts == str(tmp_path / "prompts.txt") and cfg.data.validation_prompts == str(tmp_path / "held_out.txt")
    assert cfg.run.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.model.reference == "toy" and [r.source for r in cfg.rewards] == ["toy", "toy"]


def test_cpus_needed_counts_every_role():
    cfg = load_config(None, ["cluster.trainer_workers=2", "cluster.reward_pool.replicas=3", "cluster.reference_pool.num_cpus=2"])
    assert cpus_needed(cfg) == 2 * 1.0 + 3 * 0.5 + 1 * 2.0
    assert cpus_needed(cfg, trials=3) == 3 * 2 * 1.0 + 3 * 0.5 + 1 * 2.0  # a sweep's concurrent trials each bring their trainers


def test_deepspeed_is_told_its_accelerator_by_the_workers_environment_not_at_import():
    assert "DS_ACCELERATOR" not in os.environ  # importing distar.cluster.engines set nothing
    assert worker_env(load_config())["DS_ACCELERATOR"] == "cpu"
    assert worker_env(load_config(None, ["cluster.trainer_gpus=1"]))["DS_ACCELERATOR"] == "cuda"


def test_ray_train_polls_its_workers_every_half_second_unless_the_user_says(monkeypatch):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate  # what Ray Train hands its controller

    [name] = TRAIN_CONTROLLER
    monkeypatch.delenv(name, raising=False)
    set_train_controller_env()
    assert float(get_env_vars_to_propagate()[name]) == 0.5
    monkeypatch.setenv(name, "3")
    set_train_controller_env()
    assert get_env_vars_to_propagate()[name] == "3"
