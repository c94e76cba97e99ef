"""A sweep's selection on the Pareto front: held-out constraints (numbers, or the reference
model's own values) before the selection metric; the table and the plot show them."""

import math

import numpy as np
import pytest
from PIL import Image

from distar.config import load_config
from distar.run.validation import metric_names
from distar.sweep import results, selection
from distar.sweep.results import COMPLETED, FAILED, STOPPED, Outcome


def trial(i: int, status: str, pref: float, acc: float, misplaced: float) -> Outcome:
    metrics = {"val/reward/pickscore": 2 * pref, "val/pref": pref, "val/acc/all": acc, "val/world/misplaced": misplaced, "divergence": 0.1 * i, "step": 200}
    return Outcome(f"trial_{i:05d}", status, {"objective.alpha": 0.3 * (i + 1)}, metrics, run_id=f"run{i}")


TRIALS = [trial(0, COMPLETED, 2.34, 0.375, 0.12),  # the most preferred, but it lost the prompts' alignment
          trial(1, COMPLETED, 2.07, 0.72, 0.30),  # aligned, but off the world
          trial(2, COMPLETED, 2.30, 0.84, 0.11),  # both
          trial(3, STOPPED, 2.50, 0.90, 0.10),  # better still, but stopped early: never selected
          trial(4, FAILED, math.nan, math.nan, math.nan)]
REFERENCE = {"val/reward/pickscore": 3.4, "val/pref": 1.70, "val/acc/all": 0.78, "val/world/misplaced": 0.17}


def test_constraints_come_before_the_selection_metric_each_in_its_own_direction():
    assert selection.select(TRIALS, "val/pref", "max", {}).trial_id == "trial_00000"
    limits = selection.bounds({"val/acc/all": "reference", "val/world/misplaced": 0.2}, REFERENCE)
    assert limits == {"val/acc/all": 0.78, "val/world/misplaced": 0.2}
    assert selection.select(TRIALS, "val/pref", "max", limits).trial_id == "trial_00002"
    assert selection.unmet(TRIALS[0].metrics, limits) == ["val/acc/all 0.375 < 0.78"]
    assert selection.unmet(TRIALS[1].metrics, limits) == ["val/acc/all 0.72 < 0.78", "val/world/misplaced 0.3 > 0.2"]
    assert selection.unmet({}, limits) == ["val/acc/all nan < 0.78", "val/world/misplaced nan > 0.2"]  # nothing reported: fails
    assert selection.select(TRIALS, "val/pref", "max", {"val/acc/all": 0.95}) is None


def test_a_margin_allows_that_much_worse_than_the_reference_in_each_metrics_direction():
    require = {"val/acc/all": {"reference": 0.03}, "val/world/misplaced": {"reference": 0.02}, "val/pref": "reference"}
    limits = selection.bounds(require, REFERENCE)
    assert limits == pytest.approx({"val/acc/all": 0.75, "val/world/misplaced": 0.19, "val/pref": 1.70})
    assert selection.needs_reference(require) and not selection.needs_reference({"val/acc/all": 0.5})
    text = selection.describe("val/pref", "max", require, limits)
    assert "val/acc/all >= 0.75 (the reference's, 50 steps, worse by at most 0.03)" in text
    assert "val/pref >= 1.7 (the reference's, 50 steps)," not in text and text.endswith("val/pref >= 1.7 (the reference's, 50 steps)")


def test_the_rule_says_each_bound_and_where_it_came_from():
    require = {"val/acc/all": "reference", "val/world/misplaced": 0.2}
    text = selection.describe("val/pref", "max", require, selection.bounds(require, REFERENCE))
    assert text == "best final val/pref (max) among completed trials with val/acc/all >= 0.78 (the reference's, 50 steps), val/world/misplaced <= 0.2"


def test_the_table_has_the_reference_row_and_what_each_trial_fails(tmp_path):
    limits = {"val/acc/all": 0.78}
    chosen = selection.select(TRIALS, "val/pref", "max", limits)
    table = results.markdown(TRIALS, ["objective.alpha"], ["val/pref", "val/acc/all"], chosen, "the rule", limits, REFERENCE)
    lines = table.splitlines()
    assert lines[2].startswith("| reference | reference model |  |  | 1.7 | 0.78 |")
    assert "| val/acc/all 0.375 < 0.78 |" in lines[3] and "| trial_00002 | completed |" in lines[5] and "|  | run2 |" in lines[5]
    assert lines[-1] == "Selected: trial trial_00002 (the rule)."
    csv_lines = results.to_csv(TRIALS, ["objective.alpha"], ["val/pref"], limits, REFERENCE).splitlines()
    assert csv_lines[0].split(",")[-4:] == ["divergence", "unmet", "mlflow run", "error"] and csv_lines[1].startswith("reference,")


def test_the_pareto_plot_has_a_realism_panel_with_the_reference_and_the_bounds(tmp_path):
    limits = {"val/acc/all": 0.78, "val/world/misplaced": 0.2}
    chosen = selection.select(TRIALS, "val/pref", "max", limits)
    axes = ["val/acc/all", "val/world/misplaced", "divergence"]
    with_reference = results.pareto_png(TRIALS, "val/pref", axes, chosen, tmp_path / "a.png", limits, REFERENCE)
    without = results.pareto_png(TRIALS, "val/pref", axes, chosen, tmp_path / "b.png", {}, None)
    a, b = np.asarray(Image.open(with_reference).convert("L")), np.asarray(Image.open(without).convert("L"))
    assert a.shape == b.shape and a.shape[1] > 3 * 600  # three panels
    panel = a.shape[1] // 3
    for i in (0, 1):  # the star and the dashed bound drawn on the alignment and realism panels
        assert (a[:, i * panel : (i + 1) * panel] != b[:, i * panel : (i + 1) * panel]).mean() > 0.002


@pytest.mark.slow
def test_the_reference_is_judged_like_a_validation():
    """The reference model at 50 steps, on the validation prompts, by the validation's judges: every
    val/* metric, finite, and far better aligned than its untrained one-step generator."""
    from distar.run import in_process
    from distar.run.validation import Validation

    cfg = load_config(None, ["data.validation_size=16"])
    reference = selection.reference_values(cfg)
    assert sorted(reference) == sorted(metric_names(cfg)) and all(math.isfinite(v) for v in reference.values())
    run = in_process.run_loop(cfg)
    one_step = Validation(cfg, run.parts, run.latent_shape, run.score_rewards)(run.generator)
    assert reference["val/acc/all"] > one_step["val/acc/all"] + 0.3
