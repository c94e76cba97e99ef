"""Evaluation and promotion: jobs/evaluate.py and jobs/promote.py as a user runs them against a real
MLflow server, and the pieces of distar.evaluation they are built from."""

import math
import os
import re
import time
from types import SimpleNamespace

import pytest
import torch

from distar.data import load_prompts, spread
from distar.errors import UserError
from distar.evaluation import measure, runs, subjects, table
from distar.toy import world

NAME = "eval-generator"  # a registered model of this module's own on the shared server
RAW = ("reward/pickscore", "reward/clip_score", "pref", "acc/size", "acc/color", "acc/shape", "acc/position", "acc/all", "world/misplaced", "world/off_world",
       "world/precision", "world/recall", "world/density", "world/coverage",
       "diversity", "seconds_per_image", "peak_memory_mb", "unet_calls")
AGAINST_REFERENCE = ("ref/precision", "ref/recall", "ref/density", "ref/coverage")  # the models' only; no FID from 8 images


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table's headings and body rows (cells stripped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return split(lines[0]), [split(line) for line in lines[2:]]


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def evaluated(mlflow_server, register_toy_generator, tmp_path_factory, jobs, mlflow_client):
    """Two registered versions and the reference (4 DDIM steps), evaluated in one invocation."""
    versions = [register_toy_generator(mlflow_server.uri, f"tracking.registered_model={NAME}") for _ in range(2)]
    assert [str(v.version) for v in versions] == ["1", "2"]
    work = tmp_path_factory.mktemp("evaluate")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "DISTAR_CACHE": str(work / "cache")}
    start = time.perf_counter()
    proc = jobs.run("evaluate.py", "--model", f"models:/{NAME}/1", "--model", f"models:/{NAME}/2", "--reference", "toy", "--steps", "4",
                   "--prompts", "toy", "--limit", "8", "--out", str(work / "evaluation.md"), env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"jobs/evaluate.py took {time.perf_counter() - start:.1f} s")
    return SimpleNamespace(proc=proc, table=work / "evaluation.md", env=env, work=work, client=mlflow_client(mlflow_server.uri), jobs=jobs)


def evaluation_runs(evaluated):
    """The invocation's three runs (reference and two versions), by model URI, and the baseline's metrics."""
    client = evaluated.client
    tags = [client.get_model_version(NAME, v).tags for v in ("1", "2")]
    evaluation_id = tags[0][runs.TAG_ID]
    assert tags[1][runs.TAG_ID] == evaluation_id
    experiment = client.get_experiment_by_name("distar")
    found = client.search_runs([experiment.experiment_id], f"tags.`{runs.TAG_ID}` = '{evaluation_id}'")
    assert len(found) == 3
    assert all(r.data.tags[runs.TAG_KIND] == "evaluation" and r.info.status == "FINISHED" for r in found)
    by_uri = {r.data.tags[runs.TAG_URI]: r for r in found}
    assert set(by_uri) == {"reference:toy", f"models:/{NAME}/1", f"models:/{NAME}/2"}
    base = by_uri["reference:toy"].data.metrics
    for run in found:
        metrics = run.data.metrics
        assert all(math.isfinite(metrics[f"eval/{k}"]) for k in RAW), sorted(metrics)
        assert run.data.params["prompt_count"] == "8" and run.data.params["seed"] == "30000"
    assert by_uri["reference:toy"].data.params["steps"] == "4" and base["eval/unet_calls"] == 8  # 4 steps, guided: 2 calls each
    assert "steps" not in by_uri[f"models:/{NAME}/1"].data.params
    return found, by_uri, base


@pytest.mark.slow
def test_evaluate_logs_one_run_per_model_with_its_values_and_ratios(evaluated):
    found, by_uri, base = evaluation_runs(evaluated)
    # ratios: logged against the baseline run's logged values, for every metric with a non-zero baseline
    for uri in (f"models:/{NAME}/1", f"models:/{NAME}/2"):
        metrics = by_uri[uri].data.metrics
        assert metrics["eval/unet_calls"] == 1
        # against the reference's samples on the reader's features (8 images: no FID)
        assert all(0 <= metrics[f"eval/ref/{k}"] <= 1 for k in ("precision", "recall", "coverage")) and "eval/ref/fid" not in metrics
        for k in RAW:
            if base[f"eval/{k}"] != 0:
                assert metrics[f"eval/ratio/{k}"] == pytest.approx(metrics[f"eval/{k}"] / base[f"eval/{k}"], rel=1e-6), k
            else:
                assert f"eval/ratio/{k}" not in metrics


@pytest.mark.slow
def test_evaluate_prints_and_logs_a_table_of_ratios_from_the_same_runs(evaluated):
    found, by_uri, base = evaluation_runs(evaluated)
    client = evaluated.client
    tags = [client.get_model_version(NAME, v).tags for v in ("1", "2")]
    # the table: three rows, the baseline first, every ratio cell = metric / baseline of the same runs
    text = evaluated.table.read_text()
    assert evaluated.table.read_text() in evaluated.proc.stdout
    headings, rows = table_rows(text)
    assert len(rows) == 3
    assert [row[0] for row in rows] == ["reference toy (4 steps, cfg 4.5) (baseline)", f"{NAME} v1 (toy)", f"{NAME} v2 (toy)"]  # with the training run's name
    keys = {table.HEADINGS.get(k, k.removeprefix("reward/")): k for k in (*RAW, *AGAINST_REFERENCE)}
    assert set(headings[1:]) == set(keys)
    for row, uri in zip(rows[1:], (f"models:/{NAME}/1", f"models:/{NAME}/2")):
        metrics = by_uri[uri].data.metrics
        for heading, cell in zip(headings[1:], row[1:]):
            k = keys[heading]
            value = float(cell.split()[0])
            assert value == pytest.approx(metrics[f"eval/{k}"], rel=1e-3, abs=1e-12), (uri, k, cell)
            ratio = re.search(r"\(([-+0-9.e]+)x\)", cell)
            if base.get(f"eval/{k}", 0) == 0:  # the reference has no ref/* of its own
                assert "(n/a)" in cell
            else:
                assert float(ratio.group(1)) == pytest.approx(metrics[f"eval/{k}"] / base[f"eval/{k}"], rel=1e-2), (uri, k, cell)
    assert "diversity: mean RMS pixel distance" in text and "peak MB: peak process RSS rise" in text

    # every run carries the table; the model versions and their logged models link to their runs
    for run in found:
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"evaluation.md", "samples.png", "prompts.txt"} <= artifacts
        assert client.download_artifacts(run.info.run_id, "evaluation.md", str(evaluated.work)) and (evaluated.work / "evaluation.md").read_text() == text
    for v, t in zip(("1", "2"), tags):
        run = client.get_run(t[runs.VERSION_TAG_RUN])
        assert run.data.tags[runs.TAG_URI] == f"models:/{NAME}/{v}"
        assert run.data.tags[runs.TAG_MODEL] == NAME and run.data.tags[runs.TAG_VERSION] == v
        model_id = client.get_model_version(NAME, v).source.removeprefix("models:/")
        assert [i.model_id for i in run.inputs.model_inputs] == [model_id]
        logged = {m.key: m for m in client.get_logged_model(model_id).metrics}
        assert logged["eval/pref"].run_id == run.info.run_id and logged["eval/pref"].value == run.data.metrics["eval/pref"]
        assert f"MLflow: {NAME} v{v} (toy): http://" in evaluated.proc.stdout and run.info.run_id in evaluated.proc.stdout


@pytest.mark.slow
def test_promote_shows_both_versions_side_by_side_then_moves_champion(evaluated):
    client = evaluated.client
    first = evaluated.jobs.run("promote.py", NAME, "2", env=evaluated.env, cwd=evaluated.work)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "held by no version yet -> v2" in first.stdout and "| metric | v2 |" in first.stdout
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"

    second = evaluated.jobs.run("promote.py", NAME, "1", env=evaluated.env, cwd=evaluated.work)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "| metric | v2 (champion) | v1 | difference |" in second.stdout
    metrics = {v: client.get_run(client.get_model_version(NAME, v).tags[runs.VERSION_TAG_RUN]).data.metrics for v in ("1", "2")}
    for k in ("pref", "acc/all", "seconds_per_image", "reward/pickscore"):
        a, b = metrics["2"][f"eval/{k}"], metrics["1"][f"eval/{k}"]
        assert f"| {k} | {a:.4g} | {b:.4g} | {b - a:+.4g} |" in second.stdout, second.stdout
    assert "from evaluation " in second.stdout  # both rows from the same invocation
    assert "moved champion from v2 to" in second.stdout
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("evaluate.py", ["--model", f"models:/{NAME}/99", "--prompts", "toy"], f"error: models:/{NAME}/99: not in the registry"),
        ("evaluate.py", ["--model", "models:/no-such-model@champion", "--prompts", "toy"], "error: models:/no-such-model@champion: not in the registry"),
        ("evaluate.py", ["--reference", "toy", "--prompts", "/no/such/prompts.txt"], "error: --prompts: '/no/such/prompts.txt' is not a readable file"),
        ("evaluate.py", ["--reference", "toy", "--prompts", "toy", "--limit", "8", "--features", "/no/such"], "error: --features: FID needs at least 64 images"),
        ("evaluate.py", ["--model", f"models:/{NAME}/1", "--prompts", "toy", "--features", "/no/such"], "error: --features: the distribution metrics compare"),
        ("promote.py", [NAME, "99"], f"error: {NAME} has no version 99"),
        ("promote.py", ["no-such-model", "1"], "error: no-such-model: no registered model"),
        ("promote.py", ["eval-unevaluated", "1"], "error: eval-unevaluated v1 has no evaluation run"),
    ],
    ids=["unknown-version", "unknown-model", "missing-prompts", "features-too-few", "features-no-reference",
         "promote-unknown-version", "promote-unknown-model", "promote-unevaluated"],
)
def test_bad_input_exits_2_with_one_line(evaluated, script, args, expected):
    client = evaluated.client
    if "eval-unevaluated" in args and not client.search_registered_models("name = 'eval-unevaluated'"):
        v1 = client.get_model_version(NAME, "1")  # a version of the same weights that no evaluation has seen
        client.create_registered_model("eval-unevaluated")
        client.create_model_version("eval-unevaluated", v1.source, v1.run_id, model_id=v1.source.removeprefix("models:/"))
    before = client.search_runs([client.get_experiment_by_name("distar").experiment_id], "tags.`distar.kind` = 'evaluation'")
    proc = evaluated.jobs.run(script, *args, env=evaluated.env, cwd=evaluated.work, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(expected), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    after = client.search_runs([client.get_experiment_by_name("distar").experiment_id], "tags.`distar.kind` = 'evaluation'")
    assert len(after) == len(before)  # refused before any run was created
    if script == "promote.py" and "eval-unevaluated" in args:
        forced = evaluated.jobs.run(script, *args, "--force", env=evaluated.env, cwd=evaluated.work, timeout=120)
        assert forced.returncode == 0 and "no evaluation run (--force)" in forced.stdout, forced.stderr[-2000:]


# ------------------------------------------------------------------------------------------ the pieces


def subject(label, **metrics):
    return subjects.Subject(label, label, lambda: None, metrics=metrics)


def test_ratios_and_table_against_the_baseline_row():
    base, fast = subject("ref", pref=2.0, **{"acc/all": 0.0, "seconds_per_image": 0.5}), subject("gen", pref=1.0, **{"acc/all": 0.25, "seconds_per_image": 0.01})
    fast.ratios = measure.ratios(fast.metrics, base.metrics)
    assert fast.ratios == {"pref": 0.5, "seconds_per_image": pytest.approx(0.02)}  # a zero baseline has no ratio
    text = table.markdown([base, fast], base, ["a note"])
    headings, rows = table_rows(text)
    assert headings == ["model", "pref", "acc all", "s/image"]
    assert rows == [["ref (baseline)", "2", "0", "0.5"], ["gen", "1 (0.5x)", "0.25 (n/a)", "0.01 (0.02x)"]]
    assert text.rstrip().endswith("- a note")


def test_diversity_is_the_rms_pixel_distance_between_seeds():
    a = torch.zeros(3, 3, 4, 4)
    assert measure.diversity(a, a) == 0
    assert measure.diversity(a, a + 0.25) == pytest.approx(0.25)


def test_peak_memory_sees_a_cpu_allocation():
    with measure.PeakMemory("cpu") as memory:
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        time.sleep(0.05)
        del x
    assert 48 < memory.mb < 200


def test_prompt_sources_for_evaluation(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\n")
    assert spread(load_prompts(str(path)), 3) == ["prompt 0", "prompt 3", "prompt 6"]  # spread, not the first few
    toy = spread(load_prompts("toy"), 8)
    assert len(toy) == 8 and all(world.is_world_prompt(p) for p in toy) and not world.is_world_prompt("a cat")
    for source, says in [("hf://org/prompts", "needs the `datasets` package"), (str(tmp_path / "missing.txt"), "is not a readable file")]:
        with pytest.raises(UserError, match=re.escape(says)):
            load_prompts(source, "--prompts")


def test_promotion_prefers_two_runs_of_the_same_evaluation():
    run = lambda eid, t: SimpleNamespace(data=SimpleNamespace(tags={runs.TAG_ID: eid}), info=SimpleNamespace(start_time=t))  # noqa: E731
    new = [run("c", 3), run("a", 1)]  # newest first
    old = [run("b", 2), run("a", 1)]
    assert runs.latest_pair(new, old) == (new[1], old[1])
    assert runs.latest_pair([run("c", 3)], old) == (run("c", 3), old[0])
    assert runs.latest_pair(new, []) == (new[0], None)
