"""The run on a real Ray cluster (`ray start --head` on 127.0.0.1): pools as Serve deployments,
the trainer on Ray Train with DeepSpeed ZeRO engines, checkpoints, resume, divergence, metrics.
Faults and stops: test_faults.py."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from cluster_runs import ROOT, SMOKE, checkpoints, last_state, metrics, tracked, train_args
from distar.config import load_config
from distar.run.in_process import run_loop

PARAM_TOL = 1e-6  # absolute, on weights that one Adam step moves by up to lr = 1e-4
# Adam moves every weight by about lr * sign(g) on its first step, however small g is: with the
# default eps (1e-8), weights whose gradient is at float32 rounding level (1e-9 here: summation
# order differs between one process and DeepSpeed's reductions) would move by lr in random
# directions. A larger eps keeps those still and leaves every other weight's step as it was.
ONE_STEP = ["run.steps=1", "optim.generator.eps=1e-5"]

pytestmark = pytest.mark.slow


@pytest.fixture
def run_train(jobs, ray_cluster):
    def run(*args, timeout=600):
        proc = jobs.run("train.py", *args, env=ray_cluster.run_env, timeout=timeout)
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
        return proc

    return run


def unet_params(folder: Path) -> torch.Tensor:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


@pytest.fixture(scope="module")
def in_process_one_step(tmp_path_factory, ray_cluster):
    """The single-process runner's first update on a global batch of 4 prompts."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DISTAR_CACHE", ray_cluster.env["DISTAR_CACHE"])  # the tiny models the cluster's runs use
        run = run_loop(load_config(SMOKE, ["data.batch_size=4", *ONE_STEP]))
    values = run.trainer.step(run.sampler.batch(0), torch.Generator().manual_seed(run.cfg.run.seed))
    return torch.cat([p.detach().flatten() for p in run.generator.unet.parameters()]), values


@pytest.mark.parametrize("workers", [1, 2])
def test_distributed_step_equals_in_process(run_train, in_process_one_step, tmp_path, workers):
    """Pools on Serve, W trainer ranks with the default ZeRO engines (ZeRO-1 on one rank, ZeRO-3
    across two), each training on 4/W of the batch."""
    expected, values = in_process_one_step
    out = tmp_path / "run"
    run_train(*train_args(out, *ONE_STEP, f"data.batch_size={4 // workers}", f"cluster.trainer_workers={workers}"))
    got = unet_params(out / "generator")
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() < PARAM_TOL
    (step,) = metrics(out)
    # The gradient norm is that of the whole batch's gradient (DeepSpeed averages over ranks).
    assert step["grad_norm/generator"] == pytest.approx(values["grad_norm/generator"], rel=1e-4)


@pytest.fixture(scope="module")
def submitted(ray_cluster, tmp_path_factory):
    """One run of 4 steps, checkpointed every 2, as users submit it (`ray job submit`): the
    end-to-end test's run (which comes first: its version must still be the newest, the one
    holding `candidate`), and the uninterrupted run the resume test compares against."""
    out = tmp_path_factory.mktemp("submitted") / "run"
    cmd = ["ray", "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--",
           "python", "jobs/train.py", *train_args(out, "run.steps=4", "run.checkpoint_every=2")]
    return out, subprocess.run(cmd, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=600)


def test_ray_job_submit_end_to_end(submitted, mlflow_client):
    out, proc = submitted
    assert proc.returncode == 0, proc.stdout[-5000:]
    job = re.search(r"Job '(\S+)' succeeded", proc.stdout)
    assert job and "Ray dashboard: http://" in proc.stdout
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])  # the cluster's, inherited by the job
    run = tracked(mlflow_client, out)
    assert run.info.status == "FINISHED" and run.data.tags["ray.job_id"] == job.group(1)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/pickscore")] == [1, 2, 3, 4]  # written by rank 0
    history = metrics(out)  # the smoke preset as shipped: no skipped update, every value finite
    assert all(m["skipped"] == 0 for m in history) and all(v == v and abs(v) != float("inf") for m in history for v in m.values())
    [version] = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert client.get_model_version(version.name, version.version).aliases == ["candidate"]
    kept = checkpoints(out)
    assert len(kept) == 2  # steps 2 and 4 (the end)
    assert last_state(out)["step"] == 4
    assert (kept[-1] / "generator").is_dir() and (kept[-1] / "fake_score").is_dir()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "generator")
    pipe.set_progress_bar_config(disable=True)
    t_star = json.loads((out / "generator" / "distar.json").read_text())["one_step_timestep"]
    images = pipe(["a prompt"], num_inference_steps=1, timesteps=[t_star], guidance_scale=1.0, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_resumed_run_continues_identically(run_train, submitted, tmp_path):
    (whole, finished), halves = submitted, tmp_path / "halves"
    assert finished.returncode == 0, finished.stdout[-5000:]
    run_train(*train_args(halves, "run.steps=2", "run.checkpoint_every=2"))
    proc = run_train(*train_args(halves, "run.steps=4", "run.checkpoint_every=2"))
    assert "resuming from the checkpoint at step 2" in proc.stdout + proc.stderr
    a, b = metrics(whole), metrics(halves)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m_whole, m_resumed in zip(a[2:], b[2:]):
        for key in ("loss/generator", "loss/fake_score", "divergence", "reward/pickscore"):
            assert m_resumed[key] == pytest.approx(m_whole[key], rel=1e-6), key
    assert (unet_params(whole / "generator") - unet_params(halves / "generator")).abs().max().item() < 1e-7


def test_non_finite_updates_stop_the_run(ray_cluster, jobs, mlflow_client, tmp_path):
    """A generator learning rate of 1e30 blows the weights up at the first update; every later
    loss is not finite, so the updates are skipped until the limit stops the run."""
    out = tmp_path / "run"
    args = train_args(out, "run.steps=20", "optim.generator.lr=1e30", "run.max_consecutive_skips=3")
    proc = jobs.run("train.py", *args, env=ray_cluster.run_env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run stopped at step 4: 3 updates in a row")
    history = metrics(out)
    assert [m["skipped"] for m in history] == [0, 1, 1, 1]
    assert checkpoints(out) == []  # the diverged state is not checkpointed
    assert not (out / "generator").exists()  # nothing exported from a failed run
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`distar.output_dir` = '{out.resolve()}'")
    assert run.info.status == "FAILED" and "run stopped at step 4" in run.data.tags["distar.error"]
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []  # a failed run registers nothing
