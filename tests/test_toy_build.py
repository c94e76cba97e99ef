"""The shapes world's build recipe (distar.toy.build) in its QUICK settings: every asset is written
in its ecosystem's format and loads through the code users use; jobs/generate.py samples the result."""

import json

import pytest
import torch

from distar.models.diffusion import load_parts
from distar.rewards import load_reward
from distar.toy import assets, build, reader


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    report = build.build(out, build.QUICK, log=lambda line: None)
    return out, report


@pytest.mark.slow
def test_quick_build_writes_loadable_assets(built):
    out, report = built
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"reader", "vae", "rewards", "reference"}
    judged = report["reference"]
    assert judged["best_cfg"] in build.EVAL_CFG and judged["prompts"] == build.QUICK.eval_prompts
    for scale in build.EVAL_CFG:  # the same measurement evaluation makes, at each guidance scale
        assert {"acc/all", "acc/shape", "pref", "seconds_per_image", "unet_calls"} <= set(judged[f"cfg_{scale}"])
        assert judged[f"cfg_{scale}"]["unet_calls"] == 2 * build.QUICK.eval_steps
    assert (out / "samples.png").is_file()
    parts = load_parts(assets.path("reference", out), 1000, family="toy")
    assert parts.latent_shape(32) == (4, 8, 8)
    images = torch.rand(2, 3, 32, 32)
    for name in ("pickscore", "clip_score"):
        assert load_reward(name, assets.path(name, out))(images, ["a small red circle on the left"] * 2).shape == (2,)
    reading = reader.Reader.load(assets.path("reader", out)).read(images)
    assert len(reading.color) == 2 and reading.pref.shape == (2,)


@pytest.mark.slow
def test_generate_writes_one_png_per_prompt_in_order(built, tmp_path, jobs):
    out, _ = built
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on the left\na large blue square on the right\na small green triangle on the top\n")
    images = tmp_path / "images"
    proc = jobs.run("generate.py", "--model", assets.path("reference", out), "--prompts", prompts, "--out", images, "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in images.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    again = tmp_path / "again"
    jobs.run("generate.py", "--model", assets.path("reference", out), "--prompts", prompts, "--out", again, "--steps", "2")
    assert (images / "00001.png").read_bytes() == (again / "00001.png").read_bytes()  # seeded: same image twice


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model", "--prompts", "toy"], "error: --model"),
    (["--model", "toy", "--prompts", "/no/such.txt"], "error: --prompts"),
])
def test_generate_refuses_bad_input(tmp_path, args, message, jobs):
    proc = jobs.run("generate.py", *args, "--out", tmp_path / "x", timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()
