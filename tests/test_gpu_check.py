"""bench/gpu_check.py, the prepared check for a GPU machine: its CPU twin runs here end to end on
the session's Ray cluster, and the published SD1.5 architectures it builds have SD1.5's sizes."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distar.models import published

ROOT = Path(__file__).resolve().parents[1]


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_published_configs_have_sd15s_parameter_counts():
    """Built on the meta device: shapes without weights, so no 4 GB of memory for a count."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**published.SD15_UNET)
        vae = AutoencoderKL(**published.SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**published.SD15_TEXT))
    assert {p.device.type for m in (unet, vae, text) for p in m.parameters()} == {"meta"}
    assert parameters(unet) == pytest.approx(859.5e6, rel=0.005)
    assert parameters(vae) == pytest.approx(83.7e6, rel=0.005)
    assert parameters(text) == pytest.approx(123.0e6, rel=0.005)


@pytest.mark.slow
def test_the_cpu_twin_votes_trains_and_measures(ray_cluster):
    """The same code as on a GPU (gloo for NCCL, tiny models), joining the session's cluster."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-twin"], cwd=ROOT,
                          env={**ray_cluster.run_env, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-5000:])
    report = "\n".join(line for line in out.splitlines() if re.match(r"(vote|step|reward|reference|trainer|gpu check)\b", line))
    assert "vote: process group gloo initialised on 2 rank(s) ok" in out, report
    assert re.search(r"^vote: every rank votes True: ranks agree on \[True, True\], expected True: ok$", out, re.M), report
    assert re.search(r"^vote: the last rank votes False: ranks agree on \[False, False\], expected False: ok$", out, re.M), report

    steps = re.findall(r"^step (\d+): loss/generator=(\S+) loss/fake_score=(\S+) skipped=0\.0: finite$", out, re.M)
    assert [int(s) for s, *_ in steps] == [1, 2, 3], report
    assert all(math.isfinite(float(v)) for _, *losses in steps for v in losses), report

    peaks = {role: float(mb) for role, mb in re.findall(r"^(reward|reference|trainer)\s+\d+\s+([\d.]+)\s+RSS \(psutil\)$", out, re.M)}
    assert set(peaks) == {"reward", "reference", "trainer"} and min(peaks.values()) > 0, report
    seconds = re.search(r"^step time: ([\d.]+) s/step \(steps 2-3", out, re.M)
    assert seconds and float(seconds.group(1)) > 0, report
    assert re.search(r"^gpu check: all ok$", out, re.M), report
