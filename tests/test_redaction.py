"""A tracking URI's password is never written or printed: not in the run's files, its checkpoints,
its terminal output, a config error about a neighbouring key, or what Ray and Serve are handed."""

from pathlib import Path

import pytest

from distar.config import ConfigError, load_config, to_yaml

PASSWORD = "pa55-w0rd-xyzzy"
ROOT = Path(__file__).resolve().parents[1]


def test_the_config_as_yaml_and_in_errors_holds_no_password():
    cfg = load_config(None, [f"tracking.mlflow_uri=http://alice:{PASSWORD}@127.0.0.1:5000"])
    assert cfg.tracking.mlflow_uri.endswith(f":{PASSWORD}@127.0.0.1:5000")  # the driver still has it
    assert PASSWORD not in to_yaml(cfg) and "http://***@127.0.0.1:5000" in to_yaml(cfg)
    with pytest.raises(ConfigError) as e:  # the URI under a misspelt key is echoed back
        load_config(None, [f"tracking.mlflow_url=http://alice:{PASSWORD}@127.0.0.1:5000"])
    assert "tracking.mlflow_url: Extra inputs are not permitted" in str(e.value) and PASSWORD not in str(e.value)


def test_print_config_holds_no_password(jobs):
    proc = jobs.run("train.py", "--print-config", "--set", f"tracking.mlflow_uri=http://alice:{PASSWORD}@127.0.0.1:5000")
    assert proc.returncode == 0 and "mlflow_uri: http://***@127.0.0.1:5000" in proc.stdout and PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_run_writes_the_password_nowhere(jobs, mlflow_server, tmp_path):
    """The real server takes no password; the run talks to it with one and must not leave it behind."""
    out = tmp_path / "run"
    uri = mlflow_server.uri.replace("http://", f"http://alice:{PASSWORD}@")
    proc = jobs.run("train.py", "--in-process", "--config", ROOT / "jobs/configs/smoke.yaml", "--set", "run.steps=2", "--set", "run.checkpoint_every=1",
                    "--set", f"run.output_dir={out}", "--set", f"tracking.mlflow_uri={uri}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PASSWORD not in proc.stdout + proc.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "run_config.yaml" for p in files) and any(p.name == "config.yaml" for p in files)
    assert [p for p in files if PASSWORD.encode() in p.read_bytes()] == []
