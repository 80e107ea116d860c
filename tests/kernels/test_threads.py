"""The OpenMP wait policy fam_kernels sets so that the default thread count does not
collapse on a busy CPU (fam_kernels/_threads.py; timings: benchmarks/bench_threads.py).
Checked through libgomp's own report of its settings (OMP_DISPLAY_ENV=VERBOSE), not
through timings."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _openmp_settings(code, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**base, "OMP_DISPLAY_ENV": "VERBOSE", "PYTHONPATH": ROOT, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    settings = {}
    for line in proc.stderr.splitlines():
        if "=" in line and line.startswith("  "):
            key, value = line.strip().split("=", 1)
            settings[key.strip()] = value.strip().strip("'")
    assert settings, "libgomp printed no settings: is torch's OpenMP runtime libgomp?"
    return settings, proc.stdout.strip()


def test_import_sets_passive_wait_policy():
    settings, out = _openmp_settings("import fam_kernels, torch; torch.ones(4).sum(); "
                                     "print(fam_kernels._threads.status)")
    assert out == "set"
    assert settings["GOMP_SPINCOUNT"] == "0"  # waiting threads sleep at once


def test_user_choice_is_respected():
    settings, out = _openmp_settings("import fam_kernels; print(fam_kernels._threads.status)",
                                     OMP_WAIT_POLICY="ACTIVE")
    assert out == "user" and settings["OMP_WAIT_POLICY"] == "ACTIVE"


def test_torch_first_is_reported_too_late():
    settings, out = _openmp_settings("import torch, fam_kernels; print(fam_kernels._threads.status)")
    assert out == "too late" and settings["GOMP_SPINCOUNT"] != "0"


def test_cpu_kernels_use_torchs_thread_pool():
    """No second OpenMP runtime next to torch's: the extension resolves to the libgomp torch loaded."""
    import torch

    import fam_kernels

    if fam_kernels.extension_unavailable_reason():
        pytest.skip("extension not built")
    torch.ops.fam_C.lowpass_blend_spectral  # noqa: B018  (the extension is loaded)
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "omp" in line.split()[-1].rsplit("/", 1)[-1]}
    assert len(runtimes) == 1, runtimes


def test_fam_cli_gets_the_policy():
    """`fam generate` is where the collapse was seen: the CLI must import fam_kernels
    before anything imports torch (help stays light: torch is not imported for it)."""
    settings, out = _openmp_settings("import sys, fam.cli; rc = fam.cli.main(['plan', '--model', 'sdxl', '--height', "
                                     "'17', '--width', '1024']); import torch; torch.ones(4).sum(); print(rc)")
    assert out.splitlines()[-1] == "2"  # a one-line argument error, after the runtime set-up
    assert settings["GOMP_SPINCOUNT"] == "0", "fam.cli imported torch before fam_kernels: see fam_kernels/_threads.py"


def test_fam_library_gets_the_policy():
    settings, _ = _openmp_settings("import fam; fam.FAMPipeline; import torch; torch.ones(4).sum()")
    assert settings["GOMP_SPINCOUNT"] == "0", "fam.cli imported torch before fam_kernels: see fam_kernels/_threads.py"
