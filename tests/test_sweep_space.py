"""Sweep space files: the example parses into Tune distributions; bad files are refused before
anything starts, with the entry at fault named."""

from pathlib import Path

import pytest
import yaml

from distar.config import load_config
from distar.sweep.space import SpaceError, apply, load_space

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "jobs" / "configs" / "toy_sweep.yaml"


def write(tree: dict, folder: Path) -> Path:
    out = folder / "space.yaml"
    out.write_text(yaml.safe_dump(tree))
    return out


def test_the_example_space_parses_into_tune_distributions():
    space = load_space(EXAMPLE)
    assert (space.algorithm, space.num_samples, space.scheduler, space.metric, space.mode) == ("random", 4, "asha", "val/pref", "max")
    assert (space.select_metric, space.select_mode) == ("val/pref", "max")
    assert space.require == {"val/acc/all": "reference", "val/world/misplaced": "reference"}
    tune_space = space.param_space()
    assert set(tune_space) == {"rewards.0.weight", "rewards.1.weight", "objective.alpha", "objective.cfg_scale"}
    assert tune_space["objective.alpha"].lower == 0.3 and tune_space["objective.alpha"].upper == 3.0
    assert tune_space["objective.cfg_scale"].categories == [3.0, 4.5, 6.0]
    cfg = apply(load_config(), {"objective.alpha": 0.5, "rewards.1.weight": 0.3, "objective.cfg_placement": "outside"})
    assert (cfg.objective.alpha, cfg.rewards[1].weight, cfg.objective.cfg_placement) == (0.5, 0.3, "outside")


def test_the_realism_space_bounds_every_attribute_and_the_distribution_near_the_reference():
    """jobs/configs/toy_realism_sweep.yaml, with the 64 validation prompts its comment says FID needs."""
    realism = EXAMPLE.with_name("toy_realism_sweep.yaml")
    space = load_space(realism, None, ["data.validation_size=64", "run.validate_every=250"])
    assert space.trials == 6 and (space.metric, space.mode, space.select_metric) == ("val/world/fid", "min", "val/pref")
    assert {f"val/acc/{a}" for a in ("size", "color", "shape", "position")} | {"val/world/fid", "val/world/recall"} <= set(space.require)
    assert all(bound == {"reference": bound["reference"]} for bound in space.require.values())
    with pytest.raises(SpaceError, match="val/world/fid needs at least 64 validation images"):
        load_space(realism)


def test_the_kl_realism_space_differs_from_the_score_one_only_in_its_parameters():
    """toy_realism_kl_sweep.yaml runs DI++ on the same alphas under the same stopping and selection
    rules, so the two sweeps' trials compare one for one."""
    overrides = ["data.validation_size=64", "run.validate_every=250"]
    score = load_space(EXAMPLE.with_name("toy_realism_sweep.yaml"), None, overrides)
    kl = load_space(EXAMPLE.with_name("toy_realism_kl_sweep.yaml"), None, overrides)
    rules = ("algorithm", "scheduler", "metric", "mode", "grace_period", "reduction_factor", "select_metric", "select_mode", "require")
    assert all(getattr(kl, rule) == getattr(score, rule) for rule in rules)
    assert kl.trials == 3 and kl.param_space()["objective.divergence"] == {"grid_search": ["kl"]}
    assert kl.param_space()["objective.alpha"] == score.param_space()["objective.alpha"]


def test_grid_values_become_a_grid_search(tmp_path):
    space = {"search": {"algorithm": "grid"}, "scheduler": {"metric": "val/reward/pickscore"},
             "parameters": {"objective.cfg_placement": {"grid": ["inside", "outside"]}}}
    assert load_space(write(space, tmp_path)).param_space()["objective.cfg_placement"] == {"grid_search": ["inside", "outside"]}


GOOD = {"scheduler": {"metric": "val/pref"}, "parameters": {"objective.alpha": {"uniform": [0.5, 2.0]}}}

BAD = [
    # (what changes in GOOD, the start of the message)
    ({"parameters": {"objective.alfa": {"uniform": [0.5, 2]}}}, "space error: parameters.objective.alfa: no such field in the run config; did you mean objective.alpha?"),
    ({"parameters": {"rewards.5.weight": {"uniform": [0.5, 2]}}}, "space error: parameters.rewards.5.weight: no such field"),
    ({"parameters": {"objective.alpha": {"normal": [0, 1]}}}, "space error: parameters.objective.alpha: unknown distribution 'normal'"),
    ({"parameters": {"objective.alpha": {"uniform": [2, 1]}}}, "space error: parameters.objective.alpha.uniform: low (2) must be below high (1)"),
    ({"parameters": {"objective.alpha": {"loguniform": [0, 1]}}}, "space error: parameters.objective.alpha.loguniform: a log-uniform range must be positive"),
    ({"parameters": {"objective.alpha": {"uniform": [-1, 1]}}}, "space error: parameters.objective.alpha.uniform: -1.0 is not a valid value (objective.alpha"),
    ({"parameters": {"objective.cfg_placement": {"choice": ["inside", "middle"]}}}, "space error: parameters.objective.cfg_placement.choice: 'middle' is not a valid value"),
    ({"parameters": {"objective.alpha": {"choice": []}}}, "space error: parameters.objective.alpha.choice: expected a non-empty list"),
    ({"parameters": {"objective.alpha": 0.5}}, "space error: parameters.objective.alpha: expected one distribution"),
    ({"parameters": {}}, "space error: parameters: expected a mapping of run-config paths"),
    ({"search": {"algorithm": "bayes"}}, "space error: search.algorithm: expected one of random, grid, optuna, got 'bayes'"),
    ({"search": {"num_samples": 0}}, "space error: search.num_samples: expected an integer >= 1, got 0"),
    ({"search": {"num_samples": True}}, "space error: search.num_samples: expected an integer >= 1, got True"),
    ({"search": {"workers": 4}}, "space error: search.workers: unknown key"),
    ({"search": {"algorithm": "grid"}}, "space error: parameters.objective.alpha: search.algorithm grid takes only grid parameters"),
    ({"scheduler": {"metric": "pref"}}, "space error: scheduler.metric: expected a validation metric `val/<name>`"),
    ({"scheduler": {"metric": "val/pref", "reduction_factor": 1}}, "space error: scheduler.reduction_factor: expected an integer >= 2"),
    ({"scheduler": {"metric": "val/pref", "kind": "hyperband"}}, "space error: scheduler.kind: expected one of asha, fifo"),
    ({"select": {"mode": "best"}}, "space error: select.mode: expected one of max, min"),
    ({"select": {"require": {"val/acc/all": "best"}}}, "space error: select.require.val/acc/all: expected a finite number, `reference`"),
    ({"select": {"require": {"val/acc/all": float("nan")}}}, "space error: select.require.val/acc/all: expected a finite number"),
    ({"select": {"require": {"val/acc/all": {"reference": -0.1}}}}, "space error: select.require.val/acc/all: expected a finite number, `reference` "
     "(the reference model's own value) or {reference: m} (that value worse by at most m >= 0), got {'reference': -0.1}"),
    ({"select": {"require": ["val/acc/all"]}}, "space error: select.require: expected a mapping of val/* metrics to bounds"),
    ({"select": {"require": {"val/ref/fid": "reference"}}},
     "space error: select.require.val/ref/fid: this metric already compares with the reference's samples; bound it by a number"),
    ({"select": {"require": {"val/world/fid": "reference"}}}, "space error: select.require.val/world/fid: val/world/fid needs at least 64 validation images"),
    ({"trials": 4}, "space error: trials: unknown section"),
    ({"parameters": {"rewards.0.source": {"choice": ["toy", "tiny-random"]}}}, "space error: parameters.rewards.0.source: every trial shares this field"),
    ({"parameters": {"model.reference": {"choice": ["toy"]}}}, "space error: parameters.model.reference: every trial shares this field"),
    ({"parameters": {"cluster.trainer_workers": {"choice": [1, 2]}}}, "space error: parameters.cluster.trainer_workers: every trial shares this field"),
    ({"scheduler": {"metric": "val/reward/hpsv2"}},
     "space error: scheduler.metric: val/reward/hpsv2 is not reported by this run config (it reports val/reward/pickscore, val/reward/clip_score, val/pref"),
    ({"select": {"metric": "val/acc/colour"}}, "space error: select.metric: val/acc/colour is not reported"),
    ({"parameters": {"objective.t_min": {"uniform": [20, 100]}}},
     "space error: parameters.objective.t_min.uniform: samples values such as 49.6, which this field refuses (objective.t_min: Input should be a valid integer"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split(": ")[1] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_space_files_are_refused_naming_the_entry(change, message, tmp_path):
    with pytest.raises(SpaceError) as e:
        load_space(write({**GOOD, **change}, tmp_path))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_space_files(tmp_path):
    with pytest.raises(SpaceError, match="space error: --space: .*no such file"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("parameters: [unclosed")
    with pytest.raises(SpaceError, match="space error: --space: .*not valid YAML"):
        load_space(tmp_path / "broken.yaml")


def test_metrics_are_checked_against_what_the_base_config_reports(tmp_path):
    """The reader's metrics exist only in the shapes world; no validation, no metric at all."""
    space = write(GOOD, tmp_path)
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na watercolour of a harbour\n")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"prompts": str(tmp_path / "prompts.txt")}, "rewards": [{"name": "pickscore", "source": "toy"}]}))
    with pytest.raises(SpaceError, match=r"scheduler.metric: val/pref is not reported by this run config \(it reports val/reward/pickscore\)"):
        load_space(space, base)
    base.write_text(yaml.safe_dump({"data": {"validation_size": 0}}))
    with pytest.raises(SpaceError, match=r"scheduler.metric: val/pref needs validation, which the run config turns off"):
        load_space(space, base)


def test_paths_are_checked_against_the_base_config(tmp_path):
    """rewards.1 exists in the default config (two rewards), not in a base with one."""
    base = tmp_path / "one_reward.yaml"
    base.write_text(yaml.safe_dump({"rewards": [{"name": "pickscore", "source": "toy", "weight": 1.0}]}))
    space = write({**GOOD, "parameters": {"rewards.1.weight": {"uniform": [0.1, 1.0]}}}, tmp_path)
    assert "rewards.1.weight" in load_space(space).parameters
    with pytest.raises(SpaceError, match="space error: parameters.rewards.1.weight: no such field"):
        load_space(space, base)


def test_optuna_suggests_values_inside_the_space(tmp_path):
    """The Optuna searcher the sweep builds, asked for trials as Tune asks it, stays in range."""
    from distar.sweep.runner import _search

    space = load_space(write({"search": {"algorithm": "optuna", "seed": 3}, "scheduler": {"metric": "val/pref"},
                              "parameters": {"objective.alpha": {"loguniform": [0.3, 3.0]}, "objective.cfg_scale": {"choice": [3.0, 6.0]}}}, tmp_path))
    searcher = _search(space, 2)
    assert searcher.set_search_properties("val/pref", "max", space.param_space())
    suggested = [searcher.suggest(f"t{i}") for i in range(3)]
    assert suggested[2] is None  # at most 2 in flight
    for config in suggested[:2]:
        assert 0.3 <= config["objective.alpha"] <= 3.0 and config["objective.cfg_scale"] in (3.0, 6.0)
