"""jobs/build_toy_assets.py end to end in --quick mode: every asset is written in its ecosystem's
format and loads through the code users use; jobs/generate.py samples the result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distar.models.diffusion import load_parts
from distar.rewards import load_reward
from distar.toy import assets, reader

ROOT = Path(__file__).resolve().parents[1]


def job(script, *args, timeout=600):
    return subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": ""},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    proc = job("build_toy_assets.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_build_writes_loadable_assets(built):
    report = json.loads((built / "report.json").read_text())
    assert set(report) == {"reader", "vae", "rewards", "reference"}
    assert (built / "samples.png").is_file()
    parts = load_parts(assets.path("reference", built), 1000, family="toy")
    assert parts.latent_shape(32) == (4, 8, 8)
    images = torch.rand(2, 3, 32, 32)
    for name in ("pickscore", "clip_score"):
        assert load_reward(name, assets.path(name, built))(images, ["a small red circle on the left"] * 2).shape == (2,)
    reading = reader.Reader.load(assets.path("reader", built)).read(images)
    assert len(reading.color) == 2 and reading.pref.shape == (2,)


@pytest.mark.slow
def test_generate_writes_one_png_per_prompt_in_order(built, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on the left\na large blue square on the right\na small green triangle on the top\n")
    out = tmp_path / "images"
    proc = job("generate.py", "--model", str(assets.path("reference", built)), "--prompts", str(prompts), "--out", str(out), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    again = tmp_path / "again"
    job("generate.py", "--model", str(assets.path("reference", built)), "--prompts", str(prompts), "--out", str(again), "--steps", "2")
    assert (out / "00001.png").read_bytes() == (again / "00001.png").read_bytes()  # seeded: same image twice


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model", "--prompts", "toy"], "error: --model"),
    (["--model", "toy", "--prompts", "/no/such.txt"], "error: --prompts"),
])
def test_generate_refuses_bad_input(tmp_path, args, message):
    proc = job("generate.py", *args, "--out", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()
