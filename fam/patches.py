"""Reversible, interrupt-safe changes to a diffusers pipeline for the duration of a
``with`` block: a subclass swapped in for the pipe's class (to see and adjust the
arguments of the user's own ``pipe(...)`` call), attribute patches (the UNet's
``forward``) and attention processors.

Every change registers its undo *before* it is made, and each undo is idempotent, so
an exception raised half-way through installing (a KeyboardInterrupt included) is
undone completely. The undo runs with Ctrl-C deferred (main thread) and retries an
undo step interrupted by a KeyboardInterrupt raised inside it; the first interrupt
is re-raised once everything is restored.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, List, Optional

_MISSING = object()


@contextmanager
def sigint_deferred():
    """Ctrl-C arriving inside the block is held back and raised as KeyboardInterrupt
    when the block ends (only in the main thread, where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed from C: leave it alone
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt()


class Patches:
    """An undo log. ``restore()`` undoes everything in reverse order."""

    max_attempts = 5

    def __init__(self):
        self._undo: List[Callable[[], None]] = []

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Register an idempotent undo step (call before making the change)."""
        self._undo.append(undo)

    def set_attr(self, obj, name: str, value) -> None:
        """``obj.name = value`` as an instance attribute; restore puts back the previous
        instance attribute, or removes it when there was none (class attribute visible again)."""
        previous = obj.__dict__.get(name, _MISSING)

        def undo():
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

        self.on_restore(undo)
        obj.__dict__[name] = value

    def set_class(self, obj, cls) -> None:
        original = type(obj)

        def undo():
            if type(obj) is not original:
                obj.__class__ = original

        self.on_restore(undo)
        obj.__class__ = cls

    def set_processor(self, attention_module, processor) -> None:
        original = attention_module.processor

        def undo():
            # getattr: an interrupt inside set_processor can leave the attribute missing
            if getattr(attention_module, "processor", None) is not original:
                attention_module.set_processor(original)

        self.on_restore(undo)
        attention_module.set_processor(processor)

    @property
    def pending(self) -> bool:
        return bool(self._undo)

    def restore(self) -> None:
        first_interrupt: Optional[BaseException] = None
        with _deferring_interrupts() as deferred:
            while self._undo:
                undo = self._undo[-1]
                for attempt in range(self.max_attempts):
                    try:
                        undo()
                        break
                    except KeyboardInterrupt as interrupt:  # raised inside an undo step: try it again
                        first_interrupt = first_interrupt or interrupt
                        if attempt == self.max_attempts - 1:
                            raise
                self._undo.pop()
        if first_interrupt is not None or deferred:
            raise first_interrupt or KeyboardInterrupt()


@contextmanager
def _deferring_interrupts():
    """Like :func:`sigint_deferred` but reports instead of raising: yields a list
    that is non-empty after the block when Ctrl-C arrived during it."""
    received: List[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield received
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def patched():
    """``with patched() as patches: patches.set_attr(...)``: every change is undone on
    exit, whatever the exit (exceptions and KeyboardInterrupt included)."""
    patches = Patches()
    try:
        try:
            yield patches
        finally:
            patches.restore()
    finally:
        if patches.pending:  # a Ctrl-C landed before the restore deferred it: finish the undo
            patches.restore()
