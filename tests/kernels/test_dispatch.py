"""fam_kernels.dispatch: backend capabilities as fields, explicit choices, measured
dispatch (forced timings, a deliberately failing backend, the fixed-order switch,
the disk cache) on a toy op and on both real ops on the CPU; and what
``import fam_kernels`` loads."""

import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import fam_kernels
from fam_kernels import dispatch
from fam_kernels.dispatch import Backend, BackendNotSupportedError, Dispatcher

am = importlib.import_module("fam_kernels.am_attention")
lp = importlib.import_module("fam_kernels.lowpass_blend")


@pytest.fixture(autouse=True)
def _measured(monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "measured")
    monkeypatch.delenv(dispatch.CACHE_ENV, raising=False)
    for var in ("FAM_KERNELS_BACKEND", am.ENV_VAR, lp.ENV_VAR, "TOY_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    yield
    am.DISPATCHER.reset()
    lp.DISPATCHER.reset()


def _toy(calls, fail=()):
    def make(name):
        def run(x):
            calls.append(name)
            if name in fail:
                raise RuntimeError(f"{name} does not compile")
            return x + len(name)
        return run
    return Dispatcher("toy", "TOY_BACKEND", [Backend(n, make(n)) for n in ("slow", "fast", "spare")])


def _forced(seconds):
    """A timer that runs the backend once and reports the forced time."""
    def timer(backend, fn, device_type):
        return seconds[backend.name], fn()
    return timer


def _run(d, x, shape_class=(1,)):
    return d.run(None, shape_class, lambda b: b.run(x), device_type="cpu", dtype=torch.float32)


def test_default_mode_is_fixed_on_the_cpu_and_measured_on_cuda(monkeypatch):
    monkeypatch.delenv(dispatch.MODE_ENV)
    assert dispatch.dispatch_mode("cpu") == "fixed"
    assert dispatch.dispatch_mode("cuda") == "measured"
    monkeypatch.setenv(dispatch.MODE_ENV, "measured")
    assert dispatch.dispatch_mode("cpu") == "measured"
    calls = []
    monkeypatch.delenv(dispatch.MODE_ENV)
    assert _run(_toy(calls), torch.zeros(1)).item() == len("slow")
    assert calls == ["slow"]  # untimed: the first candidate only


def test_capabilities_are_fields():
    b = Backend("x", None, devices=("cuda",), dtypes=(torch.float16,), max_head_dim=64)
    reasons = b.not_supported_reasons("cpu", torch.float32, 128)
    assert reasons == ["needs CUDA tensors, got cpu", "dtype torch.float32 not supported (supports torch.float16)",
                       "head_dim must be <= 64, got 128"]
    assert b.not_supported_reasons("cuda", torch.float16, 64) == []
    assert am.DISPATCHER.backends["cuda"].max_head_dim == 128 and am.DISPATCHER.backends["triton"].max_head_dim == 256


def test_forced_timings_pick_and_cache_the_fastest():
    calls = []
    d = _toy(calls)
    d.timer = _forced({"slow": 2.0, "fast": 1.0, "spare": 3.0})
    x = torch.zeros(2)
    assert torch.equal(_run(d, x), x + 4)  # the fastest's own output is returned
    assert calls == ["slow", "fast", "spare"] and d.winners == {("cpu", "torch.float32", 1): "fast"}
    calls.clear()
    _run(d, x)
    assert calls == ["fast"]  # cached: no timing again
    _run(d, x, shape_class=(2,))
    assert calls == ["fast", "slow", "fast", "spare"]  # a new shape class is measured


def test_failing_backend_is_marked_unusable_with_one_warning(caplog):
    calls = []
    d = _toy(calls, fail=("slow",))
    d.timer = _forced({"slow": 0.1, "fast": 1.0, "spare": 3.0})
    x = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="fam_kernels"):
        assert torch.equal(_run(d, x), x + 4)
        _run(d, x, shape_class=(2,))
    assert "slow" in d.unusable and [r.levelname for r in caplog.records] == ["WARNING"]
    assert "'slow' failed" in caplog.records[0].getMessage()
    assert calls.count("slow") == 1


def test_failure_of_the_cached_winner_falls_through(caplog, monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "fixed")
    calls = []
    d = _toy(calls, fail=("slow",))
    x = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="fam_kernels"):
        assert torch.equal(_run(d, x), x + 4)  # slow raised, fast ran
        assert torch.equal(_run(d, x), x + 4)
    assert calls == ["slow", "fast", "fast"] and len(caplog.records) == 1


def test_explicit_choice_is_never_replaced():
    d = _toy([], fail=("slow",))
    with pytest.raises(RuntimeError, match="slow does not compile"):
        d.run("slow", (1,), lambda b: b.run(torch.zeros(1)), device_type="cpu")
    with pytest.raises(BackendNotSupportedError, match="needs CPU or CUDA tensors, got meta"):
        d.select("fast", "meta")


def test_fixed_mode_runs_the_first_candidate_untimed(monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "fixed")
    calls = []
    d = _toy(calls)
    d.timer = lambda *a: pytest.fail("timed in fixed mode")
    _run(d, torch.zeros(1))
    assert calls == ["slow"] and not d.winners
    monkeypatch.setenv(dispatch.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="FAM_KERNELS_DISPATCH must be one of"):
        _run(d, torch.zeros(1))


def test_disk_cache(tmp_path, monkeypatch):
    path = tmp_path / "winners.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    d = _toy([])
    d.timer = _forced({"slow": 2.0, "fast": 3.0, "spare": 1.0})
    _run(d, torch.zeros(1))
    saved = json.loads(path.read_text())
    assert list(saved.values()) == ["spare"] and fam_kernels.__version__ in next(iter(saved))
    calls = []
    fresh = _toy(calls)
    fresh.timer = lambda *a: pytest.fail("measured although cached on disk")
    _run(fresh, torch.zeros(1))
    assert calls == ["spare"]


@pytest.mark.parametrize("winner", ["cpu", "torch"])
def test_am_attention_measured_on_the_cpu(winner):
    if set(am.DISPATCHER.candidates("cpu", torch.float32, 16)) == {am.DISPATCHER.backends["torch"]}:
        pytest.skip("extension not built: torch is the only CPU candidate")
    am.DISPATCHER.timer = _forced({"cpu": 1.0 if winner == "cpu" else 2.0, "torch": 1.5})
    try:
        inputs = [torch.randn(1, 2, 32, 16) for _ in range(3)] + [torch.randn(1, 2, 8, 16) for _ in range(2)]
        kw = dict(lam=0.6, hr_size=(4, 8), lr_size=(2, 4))
        out = fam_kernels.am_attention(*inputs, **kw)
        assert list(am.DISPATCHER.winners.values()) == [winner]
        assert torch.equal(out, fam_kernels.am_attention(*inputs, backend=winner, **kw))
    finally:
        am.DISPATCHER.timer = am.DISPATCHER._time


def test_lowpass_blend_survives_a_failing_backend(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("launch failed")

    first = lp.DISPATCHER.candidates("cpu", torch.float32)[0].name
    monkeypatch.setitem(lp.DISPATCHER.backends, first, dataclasses.replace(lp.DISPATCHER.backends[first], run=broken))
    z, zr = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    with caplog.at_level(logging.WARNING, logger="fam_kernels"):
        out = fam_kernels.lowpass_blend(z, zr, 6, 0.5)
    torch.testing.assert_close(out, fam_kernels.lowpass_blend(z, zr, 6, 0.5, backend="torch"))
    assert first in lp.DISPATCHER.unusable and "launch failed" in caplog.text


def test_import_is_light():
    code = ("import sys, fam_kernels; bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')"
            " or m in ('fam_kernels.triton.am_attention', 'fam_kernels.triton.lowpass_blend', 'torch._dynamo')];"
            " print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_backend_lists_cover_the_device(device):
    """The (device, backend) lists the oracle tests run: on the CPU the compiled kernel
    (when built) and torch; on a GPU also Triton and, when compiled, the CUDA kernels,
    so a GPU run cannot silently test only the fallback."""
    from devices import backends_on

    for dispatcher in (am.DISPATCHER, lp.DISPATCHER):
        names = backends_on(dispatcher, device)
        assert "torch" in names
        if device == "cpu":
            assert ("cpu" in names) == (fam_kernels.extension_unavailable_reason() is None)
            assert ("triton" in names) == (os.environ.get("TRITON_INTERPRET") == "1")
        else:
            from fam_kernels.triton import triton_unavailable_reason

            assert ("triton" in names) == (triton_unavailable_reason() is None)
            assert ("cuda" in names) == fam_kernels.has_cuda_kernels()
