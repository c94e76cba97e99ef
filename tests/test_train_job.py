"""jobs/train.py as a user runs it: the smoke preset end to end, and bad input refused early."""

import json
import os
import re
import signal
import time

import pytest
import torch


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["local-ray", "in-process"])
def test_smoke_run_trains_and_exports_a_one_step_pipeline(tmp_path, mode, jobs):
    """With no RAY_ADDRESS the job starts a local Ray instance; --in-process runs without Ray."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = jobs.run("train.py", "--config", "jobs/configs/smoke.yaml", "--set", f"run.output_dir={out}", "--set", "run.steps=3", *mode, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny-random" in proc.stdout  # the job says it is not training real models
    assert ("Ray dashboard: http://127.0.0.1:" in proc.stdout) == (not mode)
    steps = re.findall(r"step (\d+/\d+) \|(.*)", proc.stdout)  # on Ray, prefixed with the worker's name
    assert [done for done, _ in steps] == ["1/3", "2/3", "3/3"]
    assert all("step/s" in rest and "ETA" in rest and "reward/pickscore=" in rest for _, rest in steps)
    assert (out / "config.yaml").is_file()
    from PIL import Image

    assert Image.open(out / "before_after.png").size == (2 * 4 * 32 * 3, 2 * 4 * 32)  # 6 prompts x 2 rows, 4x enlarged

    from diffusers import StableDiffusionPipeline

    folder = out / "generator"
    t_star = json.loads((folder / "distar.json").read_text())["one_step_timestep"]
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a small red circle on the left"] * 2, num_inference_steps=1, timesteps=[t_star], guidance_scale=1.0, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.slow
def test_sigterm_ends_a_run_on_its_own_ray_instance_and_leaves_no_process_behind(tmp_path, jobs):
    """SIGTERM (a scheduler's or the OOM killer's parent's) takes Ctrl-C's path: the local Ray
    instance the job started goes down with it, agents included."""
    import psutil

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = jobs.start("train.py", "--config", "jobs/configs/smoke.yaml", "--set", f"run.output_dir={out}", "--set", "run.steps=500", env=env)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "no step in 300 s"
            time.sleep(1)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started if p.is_running())
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, log[-3000:]
    assert log.strip().splitlines()[-1] == "terminated: pools shut down; the run resumes from its last checkpoint when started again"
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], [p.pid for p in alive]  # still running after the job exited


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "objective.alpha=-1"], "config error: objective.alpha"),
        (["--set", "objective.cfg_placement=middle"], "config error: objective.cfg_placement"),
        (["--set", "nonsense=1"], "config error: nonsense"),
        (["--config", "no/such.yaml"], "config error: --config"),
        (["--set", "data.prompts=/no/such/prompts.txt"], "config error: data.prompts"),
        (["--set", "data.validation_prompts=/no/such/held_out.txt"], "config error: data.validation_prompts"),
        (["--set", "model.reference=/no/such/model"], "config error: model.reference"),
        (["--set", "run.guard.enabled=true", "--set", "run.guard.judges={world/sharpness: 0.1}"],
         "config error: run.guard.judges.world/sharpness: val/world/sharpness is not reported by this run config"),
        (["--set", "run.guard.enabled=true", "--set", "run.guard.judges={world/fid: 5}"],
         "config error: run.guard.judges.world/fid: val/world/fid needs at least 64 validation images"),
        (["--set", "data.validation_features=/no/such/dinov2"], "config error: data.validation_features: /no/such/dinov2: not a transformers model folder"),
        (["--set", "data.validation_features=reader", "--set", "data.validation_size=0"],
         "config error: data.validation_features: compares validation images with the reference's samples, but validation is off"),
        (["--set", "data.validation_features=reader", "--set", "model.resolution=64"],
         "config error: data.validation_features: the reader reads only the shapes world's prompts at 32 px; name a DINOv2 or CLIP model"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(tmp_path, args, expected, jobs):
    proc = jobs.run("train.py", *args, "--set", f"run.output_dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(expected), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
