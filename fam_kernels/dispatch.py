"""Backend selection shared by every op (after xformers' fmha dispatch).

A :class:`Backend` declares what it can run as fields (devices, dtypes, largest
head dim) plus one availability check (is the extension / Triton there); its
``not_supported_reasons`` derives the reasons from them, so no op writes adapter
functions.

Selection, the same for both ops, happens *inside* each op's registered custom op
(``torch.library.custom_op``), on the real tensors:

* an explicit choice (``backend=`` argument, then the op's environment variable,
  then ``FAM_KERNELS_BACKEND``) is honoured or refused with the reasons -- never
  silently replaced by another backend;
* otherwise the backends that apply to the inputs' device, dtype and head dim are
  the candidates, in priority order. In ``fixed`` mode the first candidate runs
  (the default on the CPU: reruns and every process of a batch run the same
  backend, so results are bit-identical). In ``measured`` mode (the default on CUDA,
  where untested speed must not be assumed) the first call of a *shape class*
  (op, device, dtype, power-of-two sizes) times every candidate on those inputs and
  caches the fastest for the process (and, with ``FAM_KERNELS_DISPATCH_CACHE=path``,
  in a JSON file keyed by device name and package version). Every backend is tested
  against the same oracle with the same tolerances (tests/), so the choice changes
  results only within those tolerances. ``FAM_KERNELS_DISPATCH=fixed|measured``
  sets the mode for every device.
* a candidate that raises (a Triton kernel that does not compile, a launch failure)
  is marked unusable for the process with one warning and the next candidate runs.

Why inside the custom op: that is the only place that always has real tensors to
time (under torch.compile the op body runs on the real inputs while tracing sees
only the fake implementation), and it keeps selection -- which reads the
environment, the extension's state and timings -- out of the traced graph. The
wrappers validate the backend *name* before calling the op, so typos still fail
before any work.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import FLOAT_DTYPES

GLOBAL_ENV = "FAM_KERNELS_BACKEND"
MODE_ENV = "FAM_KERNELS_DISPATCH"  # "measured" or "fixed"; default: measured on CUDA, fixed elsewhere
CACHE_ENV = "FAM_KERNELS_DISPATCH_CACHE"  # optional JSON file of measured winners
MODES = ("measured", "fixed")

logger = logging.getLogger("fam_kernels")


class BackendNotSupportedError(ValueError):
    """No backend (or not the requested one) can run these inputs."""


def _always_available(device_type: str) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of an op and what it supports.

    ``run`` takes the op's validated arguments. ``devices``: device types it can run
    on at all (None: any); ``auto_devices``: those on which automatic selection considers it (a
    backend may run elsewhere only when chosen explicitly: Triton on the CPU through
    its interpreter, for tests). ``availability(device_type)`` says why it cannot
    run right now (extension not built, Triton missing), or None.
    """

    name: str
    run: Callable
    devices: Optional[Tuple[str, ...]] = ("cpu", "cuda")
    auto_devices: Optional[Tuple[str, ...]] = ("cpu", "cuda")
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_head_dim: Optional[int] = None
    availability: Callable[[str], Optional[str]] = field(default=_always_available, compare=False)

    def not_supported_reasons(self, device_type: str, dtype: Optional[torch.dtype] = None,
                              head_dim: Optional[int] = None) -> List[str]:
        reasons = []
        if self.devices is not None and device_type not in self.devices:
            reasons.append(f"needs {' or '.join(d.upper() for d in self.devices)} tensors, got {device_type}")
        why = self.availability(device_type)
        if why:
            reasons.append(why)
        if dtype is not None and dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} not supported (supports {', '.join(map(str, self.dtypes))})")
        if head_dim is not None and self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"head_dim must be <= {self.max_head_dim}, got {head_dim}")
        return reasons


def dispatch_mode(device_type: str = "cpu") -> str:
    default = "measured" if device_type == "cuda" else "fixed"
    mode = os.environ.get(MODE_ENV, "").strip().lower() or default
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {list(MODES)}, got {mode!r}")
    return mode


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def _capturing(device_type: str) -> bool:
    return device_type == "cuda" and torch.cuda.is_current_stream_capturing()


def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    from ._device import device_description

    return device_description(device_type)


class Dispatcher:
    """The backends of one op, in priority order, and the process's measured winners."""

    # Timed runs per candidate on the first call of a shape class (the fastest counts).
    # On CUDA one untimed run comes first (JIT compilation, cuBLAS handles).
    TIMED_RUNS = 2

    def __init__(self, op: str, env_var: str, backends: Sequence[Backend]):
        self.op = op
        self.env_var = env_var
        self.backends: Dict[str, Backend] = {b.name: b for b in backends}
        self.winners: Dict[tuple, str] = {}  # shape class -> backend name
        self.unusable: Dict[str, str] = {}  # backend name -> why (after it raised once)
        # (backend, fn) -> seconds; replaceable by tests to force timings.
        self.timer: Callable[[Backend, Callable[[], object], str], Tuple[float, object]] = self._time

    @property
    def names(self) -> List[str]:
        return list(self.backends)

    def explain(self, device_type: str, dtype=None, head_dim=None) -> Dict[str, List[str]]:
        """Every backend and the reasons it does not apply (empty list: it applies)."""
        return {name: b.not_supported_reasons(device_type, dtype, head_dim) for name, b in self.backends.items()}

    def requested(self, backend) -> Optional[str]:
        """The explicitly requested backend's name, or None for automatic selection.
        Raises (naming the argument) for anything that is not a known name."""
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"{self.op}: backend must be a string, one of {['auto'] + self.names} or None, "
                            f"got {backend!r}")
        choice = backend or os.environ.get(self.env_var) or os.environ.get(GLOBAL_ENV)
        if choice in (None, "", "auto"):
            return None
        if choice not in self.backends:
            raise ValueError(f"{self.op}: backend must be one of {['auto'] + self.names}, got {choice!r}")
        return choice

    def candidates(self, device_type: str, dtype=None, head_dim=None) -> List[Backend]:
        """The backends automatic selection may run, in priority order; raises when none."""
        out, report = [], {}
        for name, b in self.backends.items():
            if b.auto_devices is not None and device_type not in b.auto_devices:
                report[name] = [f"not selected automatically on {device_type}"]
                continue
            if name in self.unusable:
                report[name] = [f"marked unusable: {self.unusable[name]}"]
                continue
            reasons = b.not_supported_reasons(device_type, dtype, head_dim)
            if reasons:
                report[name] = reasons
            else:
                out.append(b)
        if not out:
            lines = "; ".join(f"{n}: {', '.join(r)}" for n, r in report.items())
            raise BackendNotSupportedError(f"{self.op}: no backend applies: {lines}")
        return out

    def select(self, backend, device_type: str, dtype=None, head_dim=None) -> Backend:
        """The explicit choice (checked) or the first candidate in the fixed order."""
        choice = self.requested(backend)
        if choice is not None:
            reasons = self.backends[choice].not_supported_reasons(device_type, dtype, head_dim)
            if reasons:
                raise BackendNotSupportedError(
                    f"{self.op}: backend {choice!r} cannot run these inputs: " + "; ".join(reasons))
            return self.backends[choice]
        return self.candidates(device_type, dtype, head_dim)[0]

    # ------------------------------------------------------------------ running

    def run(self, backend, shape_class: tuple, call: Callable[[Backend], torch.Tensor], *, device_type: str,
            dtype=None, head_dim=None) -> torch.Tensor:
        """Run the op with the chosen backend: ``call(backend)`` computes the result."""
        if self.requested(backend) is not None:
            return call(self.select(backend, device_type, dtype, head_dim))
        while True:
            cands = self.candidates(device_type, dtype, head_dim)
            key = (device_type, str(dtype), *shape_class)
            if dispatch_mode(device_type) == "fixed" or len(cands) == 1:
                chosen = cands[0]
            elif _capturing(device_type):  # no timing (synchronize) inside a CUDA graph capture
                chosen = self.backends.get(self.winners.get(key, ""), cands[0])
            else:
                name = self.winners.get(key) or self._disk_winner(key, device_type)
                if name is None or name not in {b.name for b in cands}:
                    return self._measure(key, cands, call, device_type)
                chosen = self.backends[name]
            try:
                return call(chosen)
            except Exception as exc:
                self._mark_unusable(chosen, exc)

    def _mark_unusable(self, backend: Backend, exc: Exception) -> None:
        why = f"{type(exc).__name__}: {exc}"
        self.unusable[backend.name] = why
        self.winners = {k: v for k, v in self.winners.items() if v != backend.name}
        logger.warning("fam_kernels: %s backend %r failed (%s); not used again in this process",
                       self.op, backend.name, why)

    @staticmethod
    def _time(backend: Backend, fn: Callable[[], object], device_type: str) -> Tuple[float, object]:
        if device_type == "cuda":
            fn()
        best, out = float("inf"), None
        for _ in range(Dispatcher.TIMED_RUNS):
            _sync(device_type)
            t0 = time.perf_counter()
            out = fn()
            _sync(device_type)
            best = min(best, time.perf_counter() - t0)
        return best, out

    def _measure(self, key: tuple, cands: List[Backend], call, device_type: str) -> torch.Tensor:
        results = []
        for b in cands:
            try:
                seconds, out = self.timer(b, lambda b=b: call(b), device_type)
            except Exception as exc:
                self._mark_unusable(b, exc)
                continue
            results.append((seconds, b.name, out))
        if not results:
            failures = "; ".join(f"{n}: {w}" for n, w in self.unusable.items())
            raise BackendNotSupportedError(f"{self.op}: every applicable backend failed: {failures}")
        seconds, name, out = min(results, key=lambda r: r[0])
        self.winners[key] = name
        logger.info("fam_kernels: %s on %s: %s (%s)", self.op, key, name,
                    ", ".join(f"{n} {s * 1e3:.3g} ms" for s, n, _ in results))
        self._store_disk_winner(key, name, device_type)
        return out

    # ------------------------------------------------------------------ optional disk cache

    def _disk_key(self, key: tuple, device_type: str) -> str:
        from . import __version__

        return "|".join([self.op, _device_name(device_type), __version__, *map(str, key)])

    def _disk_winner(self, key: tuple, device_type: str) -> Optional[str]:
        path = os.environ.get(CACHE_ENV)
        if not path or not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                name = json.load(f).get(self._disk_key(key, device_type))
        except (OSError, ValueError):
            return None
        if name in self.backends:
            self.winners[key] = name
            return name
        return None

    def _store_disk_winner(self, key: tuple, name: str, device_type: str) -> None:
        path = os.environ.get(CACHE_ENV)
        if not path:
            return
        try:
            data = {}
            if os.path.exists(path):
                with open(path) as f:
                    data = json.load(f)
            data[self._disk_key(key, device_type)] = name
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except (OSError, ValueError) as exc:
            logger.warning("fam_kernels: could not write the dispatch cache %s: %s", path, exc)

    def reset(self) -> None:
        """Forget measured winners and unusable marks (tests, benchmarks)."""
        self.winners.clear()
        self.unusable.clear()


def size_class(n: int) -> int:
    """The power of two at or above ``n``: sizes in one class share a measured winner."""
    return 1 << max(0, int(n) - 1).bit_length()
