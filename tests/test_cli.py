"""What every job shares: one parser, and endings decided by the error's type, never its text."""

import pytest

from distar import cli
from distar.config import ConfigError
from distar.errors import RunFailed, UserError
from distar.storage import StorageError
from distar.sweep.space import SpaceError

JOBS = ["train.py", "sweep.py", "evaluate.py", "promote.py", "generate.py", "build_toy_assets.py", "plan.py"]


@pytest.mark.parametrize("error, line, status", [
    (ConfigError("objective.alpha: must be >= 0"), "config error: objective.alpha: must be >= 0", 2),
    (SpaceError("parameters.x: no such field"), "space error: parameters.x: no such field", 2),
    (StorageError("model.reference: s3://b/m: access denied"), "error: model.reference: s3://b/m: access denied", 2),
    (UserError("config error: looks like one"), "error: config error: looks like one", 2),  # the text decides nothing
    (RunFailed("run stopped at step 4: too many skips"), "error: run stopped at step 4: too many skips", 1),
    (KeyboardInterrupt(), "interrupted: pools shut down", 130),
])
def test_a_jobs_ending_comes_from_the_errors_type(error, line, status, capsys):
    assert cli.exit_status(error, "pools shut down") == status
    assert capsys.readouterr().err == line + "\n"


def test_every_line_of_a_config_error_names_its_kind(capsys):
    def body():
        raise ConfigError("data.batch_size: too small\nobjective.alpha: negative")

    assert cli.run(body) == 2
    assert capsys.readouterr().err.splitlines() == ["config error: data.batch_size: too small", "config error: objective.alpha: negative"]


def test_a_bug_keeps_its_traceback():
    def body():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        cli.run(body)


@pytest.mark.parametrize("script", JOBS)
def test_every_job_takes_the_one_parser(script, jobs):
    helped = jobs.run(script, "--help", timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: "), helped.stderr[-2000:]
    wrong = jobs.run(script, "--no-such-option", timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].startswith("error: "), wrong.stderr[-2000:]
    assert f"(see jobs/{script} --help)" in wrong.stderr
