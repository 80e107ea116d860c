"""tools/gpu_check.sh runs its CPU-runnable parts without a GPU: the op benchmark code
at tiny shapes, the SDXL UNet part reported as skipped, the files written."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the real check")
def test_gpu_check_cpu_path(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no CUDA device: skipping the CUDA test run" in proc.stdout
    with open(tmp_path / "gpu-cpu-smoke.csv") as f:
        rows = list(csv.DictReader(f))
    providers = {(r["op"], r["provider"]) for r in rows}
    assert {("am_attention", "sdpa (floor)"), ("am_attention", "default"), ("lowpass_blend", "torch")} <= providers
    assert all(float(r["ms"]) > 0 for r in rows if r["op"] != "sdxl_unet")
    unet = [r for r in rows if r["op"] == "sdxl_unet"]
    assert len(unet) == 1 and unet[0]["note"].startswith("skipped")
    assert (tmp_path / "gpu-cpu-smoke.md").read_text().startswith("# GPU check: cpu-smoke")
