"""Files built to break a reader: each is refused with one line naming what is wrong (exit 2 from
a job), in bounded time and memory, before anything starts."""

import shutil

import pytest

from distar.config import ConfigError, load_config
from distar.data import PromptError, load_prompts
from distar.run.build import check_inputs
from distar.sweep.space import SpaceError, load_space

# Nine levels, each repeating the one below ten times: 10^9 values once expanded, 300 bytes of text.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))


def one_line(error) -> str:
    assert "\n" not in str(error)
    return str(error)


def test_a_csv_field_over_the_csv_limit(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\n" + "x" * 200_000 + "\n")
    with pytest.raises(PromptError) as e:
        load_prompts(str(tmp_path / "p.csv"))
    assert one_line(e.value).startswith(f"error: data.prompts: '{tmp_path / 'p.csv'}' is not a readable CSV: field larger than field limit")


def test_json_nested_past_the_stack(tmp_path):
    (tmp_path / "p.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PromptError) as e:
        load_prompts(str(tmp_path / "p.json"))
    assert "JSON nested too deeply to be a list of prompts" in one_line(e.value)


def test_a_set_value_nested_past_the_stack():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.name=" + "[" * 5000 + "]" * 5000])
    assert one_line(e.value).startswith("config error: run.name: value ") and "nested more than 64 levels deep" in str(e.value)


def test_an_alias_bomb_as_the_config(tmp_path):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB + "run: {name: *i}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "bomb.yaml")
    assert one_line(e.value) == f"config error: --config {tmp_path / 'bomb.yaml'}: not valid YAML: expands to more than 100000 values (aliases repeating aliases?)"


def test_an_alias_bomb_as_the_space(tmp_path):
    (tmp_path / "space.yaml").write_text(ALIAS_BOMB + "parameters: {objective.alpha: {choice: *i}}\n")
    with pytest.raises(SpaceError) as e:
        load_space(tmp_path / "space.yaml")
    assert "expands to more than 100000 values" in one_line(e.value)


def test_an_alias_bomb_through_the_job_exits_2(jobs, tmp_path):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB + "run: {name: *i}\n")
    proc = jobs.run("train.py", "--in-process", "--config", tmp_path / "bomb.yaml", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("expands to more than 100000 values (aliases repeating aliases?)")


def test_a_model_folder_without_its_scheduler_config(tiny_pipeline, tmp_path, jobs):
    broken = shutil.copytree(tiny_pipeline, tmp_path / "broken")
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ConfigError) as e:
        check_inputs(load_config("jobs/configs/smoke.yaml", [f"model.reference={broken}"]))
    says = f"config error: model.reference: {broken} is not a complete diffusers pipeline folder: it has no scheduler/scheduler_config.json"
    assert one_line(e.value) == says
    proc = jobs.run("train.py", "--in-process", "--config", "jobs/configs/smoke.yaml", "--set", f"model.reference={broken}",
                    "--set", f"run.output_dir={tmp_path / 'run'}", timeout=120)
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (2, [says])
    assert not (tmp_path / "run").exists()

