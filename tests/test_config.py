"""The run config: defaults validate, bad configs fail with a message naming the field, overrides merge."""

import math
from pathlib import Path

import pytest

from distar.config import ConfigError, RunConfig, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]
NO_FILE = "<no such file>"  # stands in for the YAML text: pass a path that does not exist


def load(tmp_path, yaml_text=None, overrides=()):
    """load_config with `yaml_text` written to a file (None: no file; NO_FILE: a missing file)."""
    path = None
    if yaml_text == NO_FILE:
        path = tmp_path / "missing.yaml"
    elif yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
    return load_config(path, list(overrides))


# --------------------------------------------------------------------------- defaults


def test_default_config_validates():
    cfg = RunConfig()
    assert cfg.model.t_star < cfg.model.num_train_timesteps
    assert cfg.objective.t_min < cfg.objective.t_max < cfg.model.num_train_timesteps
    assert [(r.name, r.source) for r in cfg.rewards] == [("pickscore", "toy"), ("clip_score", "toy")]  # the shapes world
    # load_config with no file and no overrides is exactly the embedded default.
    assert load_config().model_dump() == cfg.model_dump()


def test_default_config_round_trips_through_yaml(tmp_path):
    cfg = load(tmp_path, to_yaml(RunConfig()))
    assert cfg.model_dump() == RunConfig().model_dump()


# --------------------------------------------------------------------------- bad configs

# (id, yaml_or_None, overrides, expected field path in the message)
BAD = [
    # wrong types
    ("string-for-int", "run:\n  steps: abc\n", [], "run.steps"),
    ("float-for-int", None, ["run.seed=2.5"], "run.seed"),
    ("list-for-float", None, ["objective.alpha=[1, 2]"], "objective.alpha"),
    ("list-for-float-yaml", "objective:\n  cfg_scale: [4.5]\n", [], "objective.cfg_scale"),
    # unknown keys
    ("unknown-top-level-yaml", "trainer:\n  lr: 0.1\n", [], "trainer"),
    ("unknown-top-level-set", None, ["optimiser=1"], "optimiser"),
    ("unknown-nested-set", None, ["objective.alfa=0.5"], "objective.alfa"),
    ("unknown-nested-yaml", "model:\n  famliy: sd15\n", [], "model.famliy"),
    ("unknown-in-reward", "rewards:\n- {name: pickscore, source: x, wieght: 1}\n", [], "rewards.0.wieght"),
    # ranges
    ("negative-lr", None, ["optim.generator.lr=-0.0001"], "optim.generator.lr"),
    ("zero-lr-yaml", "optim:\n  fake_score:\n    lr: 0\n", [], "optim.fake_score.lr"),
    ("negative-alpha", None, ["objective.alpha=-0.5"], "objective.alpha"),
    ("zero-batch-size", None, ["data.batch_size=0"], "data.batch_size"),
    ("huber-c-zero", None, ["objective.huber_c=0"], "objective.huber_c"),
    ("beta-one", None, ["optim.generator.betas=[0.9, 1.0]"], "optim.generator.betas.1"),
    ("beta-negative", "optim:\n  fake_score:\n    betas: [-0.1, 0.99]\n", [], "optim.fake_score.betas.0"),
    ("zero-stage-4", None, ["cluster.zero_stage=4"], "cluster.zero_stage"),
    ("zero-stage-0", None, ["cluster.zero_stage=0"], "cluster.zero_stage"),  # DeepSpeed without ZeRO neither reports the norm nor skips a non-finite step
    # schedule consistency
    ("t-star-past-schedule", None, ["model.t_star=1000"], "model.t_star"),
    ("t-star-zero", None, ["model.t_star=0"], "model.t_star"),
    ("t-star-vs-short-schedule", None, ["model.num_train_timesteps=100"], "model.t_star"),
    ("t-max-past-schedule", None, ["objective.t_max=1000"], "objective.t_max"),
    ("t-min-equals-t-max", None, ["objective.t_min=500", "objective.t_max=500"], "objective.t_min"),
    ("t-min-above-t-max", "objective:\n  t_min: 900\n  t_max: 100\n", [], "objective.t_min"),
    # rewards
    ("reward-only-no-rewards", "objective:\n  alpha: 0\nrewards: []\n", [], "rewards"),
    ("reward-only-zero-weights", None, ["objective.alpha=0", "rewards.0.weight=0", "rewards.1.weight=0"], "rewards"),
    ("reward-weight-nan", "rewards:\n- {name: pickscore, source: x, weight: .nan}\n", [], "rewards.0.weight"),
    ("reward-weight-inf", "rewards:\n- {name: pickscore, source: x, weight: .inf}\n", [], "rewards.0.weight"),
    ("reward-weight-nan-set", None, ["rewards.0.weight=.nan"], "rewards.0.weight"),
    ("reward-weight-negative", None, ["rewards.0.weight=-1"], "rewards.0.weight"),
    ("reward-missing-source", "rewards:\n- {name: pickscore, weight: 1}\n", [], "rewards.0.source"),
    ("reward-empty-source", "rewards:\n- {name: pickscore, source: '', weight: 1}\n", [], "rewards.0.source"),
    ("reward-unknown-name", "rewards:\n- {name: dalle_score, source: x}\n", [], "rewards.0.name"),
    ("reward-second-bad", "rewards:\n- {name: pickscore, source: x}\n- {name: hpsv2, source: x, weight: -2}\n", [], "rewards.1.weight"),
    ("reward-duplicate-names", "rewards:\n- {name: hpsv2, source: a}\n- {name: hpsv2, source: b}\n", [], "rewards"),
    # the guard
    ("guard-without-judges", None, ["run.guard.enabled=true"], "run.guard.enabled"),
    ("guard-without-validation", None, ["run.guard.enabled=true", "run.guard.judges={acc/all: 0.1}", "data.validation_size=0"], "run.guard.enabled"),
    ("guard-on-a-trained-reward", None, ["run.guard.judges={reward/pickscore: 0.1}"], "run.guard.judges.reward/pickscore"),
    ("guard-negative-margin", None, ["run.guard.judges={acc/all: -0.1}"], "run.guard.judges.acc/all"),
    ("guard-action-unknown", None, ["run.guard.action=restart"], "run.guard.action"),
    # literals
    ("divergence-js", None, ["objective.divergence=js"], "objective.divergence"),
    ("cfg-placement-middle", None, ["objective.cfg_placement=middle"], "objective.cfg_placement"),
    ("dtype-int8", "model:\n  dtype: int8\n", [], "model.dtype"),
    ("family-unknown", None, ["model.family=sd3"], "model.family"),
    # --set syntax and paths
    ("set-no-equals", None, ["objective.alpha"], "--set 'objective.alpha'"),
    ("set-empty-path", None, ["=1"], "--set '=1'"),
    ("set-bad-yaml-value", None, ["objective.alpha=[1"], "objective.alpha"),
    ("set-list-index-out-of-range", None, ["rewards.5.weight=1"], "rewards.5"),
    ("set-list-index-not-a-number", None, ["rewards.first.weight=1"], "rewards.first"),
    ("set-into-a-scalar", None, ["objective.alpha.value=1"], "objective.alpha"),
    # the file itself
    ("file-missing", NO_FILE, [], "--config"),
    ("yaml-not-a-mapping", "- run\n- model\n", [], "--config"),
    ("yaml-scalar", "just a string\n", [], "--config"),
    ("yaml-invalid", "run: {name: [unclosed\n", [], "--config"),
]


@pytest.mark.parametrize(("yaml_text", "overrides", "path"), [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_config_names_the_field(tmp_path, yaml_text, overrides, path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, yaml_text, overrides)
    message = str(err.value)
    assert message.startswith("config error: ")
    assert f"config error: {path}" in message


def test_bad_value_message_shows_what_was_given(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, overrides=["data.batch_size=0"])
    assert str(err.value) == "config error: data.batch_size: Input should be greater than or equal to 1 (got 0)"


def test_every_field_error_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "run:\n  steps: abc\n", ["objective.alpha=-1", "model.dtype=int8"])
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("config error: ") for line in lines)
    assert {line.split(":")[1].strip() for line in lines} == {"run.steps", "objective.alpha", "model.dtype"}


def test_bad_config_error_is_a_user_error():
    # Entry points catch UserError alone to turn it into one line and exit status 2.
    from distar.errors import UserError

    with pytest.raises(UserError):
        load_config(overrides=["objective.alpha=-1"])


# Run presets; *_sweep.yaml files beside them are sweep spaces (tests/test_sweep_space.py).
PRESETS = sorted(p for p in (Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml") if not p.name.endswith("_sweep.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_validate(preset):
    cfg = load_config(preset)
    assert Path(cfg.run.output_dir).name == cfg.run.name  # each preset writes to its own runs/<name>


def test_toy_preset_spells_out_the_default():
    """The README offers jobs/configs/toy.yaml as the default run written out: it must not drift."""
    toy = next(p for p in PRESETS if p.name == "toy.yaml")
    assert load_config(toy).model_dump() == RunConfig().model_dump()


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "section", "field", "expected"),
    [
        ("objective.alpha=0.5", "objective", "alpha", 0.5),
        ("cluster.zero_stage=2", "cluster", "zero_stage", 2),
        ("model.generator_init=null", "model", "generator_init", None),
        ("model.generator_init=~", "model", "generator_init", None),
        ("optim.grad_clip=null", "optim", "grad_clip", None),
        ("model.generator_init=runs/x/generator", "model", "generator_init", "runs/x/generator"),
        ("tracking.mlflow_uri=http://mlflow:5000", "tracking", "mlflow_uri", "http://mlflow:5000"),
        ("run.name=a=b", "run", "name", "a=b"),  # only the first '=' splits
    ],
)
def test_set_values_are_yaml_scalars(override, section, field, expected):
    value = getattr(getattr(load_config(overrides=[override]), section), field)
    assert value == expected
    assert type(value) is type(expected)


def test_set_parses_raw_yaml_before_validation():
    # The raw scalar reaching the tree is typed by YAML, not left as a string.
    from distar.config import parse_override

    assert parse_override("objective.alpha=0.5") == ("objective.alpha", 0.5)
    assert parse_override("cluster.zero_stage=2") == ("cluster.zero_stage", 2)
    assert parse_override("model.generator_init=null") == ("model.generator_init", None)
    assert parse_override("optim.generator.betas=[0.5, 0.9]") == ("optim.generator.betas", [0.5, 0.9])
    assert parse_override("run.name=") == ("run.name", "")


def test_set_beats_the_yaml_file(tmp_path):
    cfg = load(tmp_path, "objective:\n  alpha: 0.25\n  cfg_scale: 7.0\n", ["objective.alpha=0.75"])
    assert cfg.objective.alpha == 0.75
    assert cfg.objective.cfg_scale == 7.0  # the file's other values in the section stay


def test_later_set_beats_earlier_set():
    cfg = load_config(overrides=["run.steps=5", "run.steps=7"])
    assert cfg.run.steps == 7


def test_yaml_file_merges_into_default_sections(tmp_path):
    cfg = load(tmp_path, "model:\n  resolution: 64\n")
    assert cfg.model.resolution == 64
    assert cfg.model.t_star == RunConfig().model.t_star  # untouched siblings keep their defaults
    assert cfg.objective == RunConfig().objective


def test_set_reaches_into_the_default_rewards_list():
    cfg = load_config(overrides=["rewards.0.weight=2"])
    assert len(cfg.rewards) == 2 and cfg.rewards[1].weight == RunConfig().rewards[1].weight
    assert cfg.rewards[0].name == "pickscore"
    assert cfg.rewards[0].weight == 2.0


def test_yaml_file_replaces_the_rewards_list(tmp_path):
    cfg = load(
        tmp_path,
        "rewards:\n- {name: hpsv2, source: tiny-random, weight: 0.5}\n- {name: aesthetic, source: s3://b/aes}\n",
    )
    assert [(r.name, r.source, r.weight) for r in cfg.rewards] == [
        ("hpsv2", "tiny-random", 0.5),
        ("aesthetic", "s3://b/aes", 1.0),
    ]


def test_set_reaches_into_a_yaml_rewards_list(tmp_path):
    text = "rewards:\n- {name: hpsv2, source: a}\n- {name: clip_score, source: b}\n"
    cfg = load(tmp_path, text, ["rewards.1.weight=0.1", "rewards.1.source=c"])
    assert cfg.rewards[0].weight == 1.0
    assert (cfg.rewards[1].name, cfg.rewards[1].source, cfg.rewards[1].weight) == ("clip_score", "c", 0.1)


def test_set_can_replace_a_whole_list():
    cfg = load_config(overrides=["rewards=[{name: image_reward, source: x, weight: 3}]", "objective.alpha=0"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("image_reward", 3.0)]
    assert cfg.objective.alpha == 0.0


def test_reward_only_objective_with_a_positive_reward_is_fine():
    cfg = load_config(overrides=["objective.alpha=0"])
    assert cfg.objective.alpha == 0.0
    assert not math.isnan(cfg.rewards[0].weight) and cfg.rewards[0].weight > 0


# --------------------------------------------------------------------------- edge cases that once crashed


def test_set_reaches_into_default_betas():
    cfg = load_config(overrides=["optim.generator.betas.0=0.5"])
    assert cfg.optim.generator.betas == (0.5, 0.999)


def test_set_value_with_control_character_is_a_config_error():
    with pytest.raises(ConfigError, match="config error: objective.alpha"):
        load_config(overrides=["objective.alpha=\x01"])


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"run:\n  name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="config error: --config"):
        load_config(path)
