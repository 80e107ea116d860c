"""Interrupt safety of attaching FAM to a pipe: a Ctrl-C at any line of installing or
restoring (and a second one during the restore) leaves the pipe with exactly its
original class, attention processors and UNet forward, no FAM patch, and the SIGINT
handler as it was.

Ctrl-C is simulated faithfully: at the chosen line the *currently installed* Python
SIGINT handler is called (the default one raises KeyboardInterrupt there; FAM's
deferring handler records it), as CPython does when the signal arrives.
"""

import gc
import random
import signal
import sys
import threading
import time
import types

import pytest
import torch
from diffusers.models.attention_processor import Attention

import fam
import fam.attach
import fam.attention
import fam.patches
from fam.attention import FAMAttnProcessor
from fam.testing import tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _code_objects(obj):
    """Every code object of a function / class / module, nested closures included."""
    found = set()

    def walk(code):
        found.add(code)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    if isinstance(obj, types.ModuleType):
        members = vars(obj).values()
    elif isinstance(obj, type):
        members = vars(obj).values()
    else:
        members = [obj]
    for member in members:
        member = getattr(member, "__wrapped__", member)
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            member = member.fget
        if isinstance(member, type) and member.__module__ == getattr(obj, "__name__", None):
            found |= _code_objects(member)
        elif isinstance(member, types.FunctionType):
            walk(member.__code__)
    return found


TARGETS = (_code_objects(fam.patches) | _code_objects(fam.attention.install_processors)
           | _code_objects(fam.attach._Pass.attach) | _code_objects(fam.attach.record_native.__wrapped__)
           | _code_objects(fam.attach.modulate.__wrapped__) | _code_objects(Attention.set_processor))


class CtrlC:
    """Deliver a simulated Ctrl-C at the n-th executed line of the target code."""

    def __init__(self, at=()):
        self.at, self.count = set(at), 0

    def tracer(self, frame, event, arg):
        return self.local if frame.f_code in TARGETS else None

    def local(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count in self.at:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, frame)
        return self.local


def fam_cycle(pipe, am_source="recompute"):
    generator = torch.Generator().manual_seed(0)
    with fam.record_native(pipe, am_source=am_source) as native:
        pipe("a red cube", num_inference_steps=1, generator=generator, output_type="latent")
    with fam.modulate(pipe, native, scale=2):
        return pipe("a red cube", num_inference_steps=1, generator=generator, output_type="latent").images


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own Ctrl-C handler, also when the tests run as a background job (SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def snapshot(pipe):
    return type(pipe), dict(pipe.unet.attn_processors)


def assert_pristine(pipe, before):
    cls, processors = before
    assert type(pipe) is cls
    now = pipe.unet.attn_processors
    assert now.keys() == processors.keys() and all(now[k] is processors[k] for k in processors)
    assert not any(isinstance(p, FAMAttnProcessor) for p in now.values())
    assert "forward" not in vars(pipe.unet) and "prepare_latents" not in vars(pipe)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def count_target_lines(pipe, am_source):
    counter = CtrlC()
    sys.settrace(counter.tracer)
    try:
        fam_cycle(pipe, am_source)
    finally:
        sys.settrace(None)
    return counter.count


@pytest.mark.parametrize("am_source, stride", [("recompute", 1), ("cache", 5)])
def test_one_ctrl_c_at_every_line_of_install_and_restore(pipe, am_source, stride):
    before = snapshot(pipe)
    reference = fam_cycle(pipe, am_source)
    lines = count_target_lines(pipe, am_source)
    assert lines > 50
    for n in range(1 + stride // 2, lines + 1, stride):
        injector = CtrlC([n])
        sys.settrace(injector.tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                fam_cycle(pipe, am_source)
        finally:
            sys.settrace(None)
        assert_pristine(pipe, before)
    assert torch.equal(fam_cycle(pipe, am_source), reference)


def test_a_second_ctrl_c_during_the_restore(pipe, monkeypatch):
    """First Ctrl-C at line n of the install/restore code, second one at line m of the
    (re-traced) restore that follows."""
    before = snapshot(pipe)
    real_restore = fam.patches.Patches.restore
    lines = count_target_lines(pipe, "recompute")
    rng = random.Random(0)
    for n in sorted(rng.sample(range(1, lines + 1), 15)):
        for m in (1, 2, 5, 13):
            second = CtrlC([m])

            def restore(self):
                sys.settrace(second.tracer)
                return real_restore(self)

            monkeypatch.setattr(fam.patches.Patches, "restore", restore)
            sys.settrace(CtrlC([n]).tracer)
            try:
                with pytest.raises(KeyboardInterrupt):
                    fam_cycle(pipe)
            finally:
                sys.settrace(None)
            assert_pristine(pipe, before)
    monkeypatch.setattr(fam.patches.Patches, "restore", real_restore)


def test_an_undo_step_raising_keyboard_interrupt_is_retried(pipe, monkeypatch):
    before = snapshot(pipe)
    real = Attention.set_processor
    calls = {"n": 0}

    def flaky(self, processor):
        calls["n"] += 1
        if calls["n"] in (5, 6):  # the first restores (after 4 installs), twice in a row
            raise KeyboardInterrupt()
        return real(self, processor)

    monkeypatch.setattr(Attention, "set_processor", flaky)
    with pytest.raises(KeyboardInterrupt):
        fam_cycle(pipe, "cache")
    monkeypatch.setattr(Attention, "set_processor", real)
    assert_pristine(pipe, before)


def test_randomized_ctrl_c_from_a_timer_thread(pipe, monkeypatch):
    """Real asynchronous interrupts (``_thread.interrupt_main``) at random moments of
    many FAM cycles, sometimes two in quick succession."""
    # an interrupt landing in some object's __del__ (tqdm's) is "unraisable": Python prints and drops
    # it; keep pytest's hook from formatting it while a second interrupt may arrive
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    before = snapshot(pipe)
    start = time.perf_counter()
    fam_cycle(pipe)
    duration = time.perf_counter() - start
    rng = random.Random(1)
    gc.disable()  # a Ctrl-C inside a gc callback is "unraisable": not what this test is about
    try:
        _randomized_trials(pipe, before, rng, duration)
    finally:
        gc.enable()


def _randomized_trials(pipe, before, rng, duration):
    import _thread

    interrupted = 0
    for trial in range(60):
        delays = [rng.uniform(0, duration)]
        if trial % 2:
            delays.append(delays[0] + rng.uniform(0, duration / 10))

        def fire(delays=delays):
            t0 = time.perf_counter()
            for delay in delays:
                time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
                _thread.interrupt_main()

        timer = threading.Thread(target=fire)
        timer.start()
        try:
            fam_cycle(pipe)
            timer.join()
            time.sleep(0.01)  # an interrupt fired after the cycle lands here
        except KeyboardInterrupt:
            interrupted += 1
        try:
            timer.join()
            time.sleep(0.01)
        except KeyboardInterrupt:
            pass
        assert_pristine(pipe, before)
    assert interrupted > 10
