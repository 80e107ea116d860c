"""Backend selection shared by every op (after xformers' fmha dispatch).

Each backend answers ``not_supported_reasons(**inputs)`` with a list of strings; the
first backend in priority order whose list is empty and that runs automatically on
the inputs' device wins. An explicit choice (argument, then the op's environment
variable, then ``FAM_KERNELS_BACKEND``) is honoured or refused with the reasons --
never silently replaced by another backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

GLOBAL_ENV = "FAM_KERNELS_BACKEND"


class BackendNotSupportedError(ValueError):
    """No backend (or not the requested one) can run these inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable
    not_supported_reasons: Callable[..., List[str]]
    # Device types on which automatic selection considers this backend. A backend
    # may support more devices when chosen explicitly (Triton on the CPU through
    # its interpreter, for tests).
    auto_devices: Sequence[str] = ("cpu", "cuda")


class Dispatcher:
    def __init__(self, op: str, env_var: str, backends: Sequence[Backend]):
        self.op = op
        self.env_var = env_var
        self.backends: Dict[str, Backend] = {b.name: b for b in backends}

    @property
    def names(self) -> List[str]:
        return list(self.backends)

    def explain(self, **inputs) -> Dict[str, List[str]]:
        """Every backend and the reasons it does not apply (empty list: it applies)."""
        return {name: list(b.not_supported_reasons(**inputs)) for name, b in self.backends.items()}

    def requested(self, backend: Optional[str]) -> Optional[str]:
        choice = backend or os.environ.get(self.env_var) or os.environ.get(GLOBAL_ENV)
        if choice in (None, "", "auto"):
            return None
        if choice not in self.backends:
            raise ValueError(
                f"{self.op}: backend must be one of {['auto'] + self.names}, got {choice!r}"
            )
        return choice

    def select(self, backend: Optional[str], device_type: str, **inputs) -> Backend:
        choice = self.requested(backend)
        if choice is not None:
            reasons = self.backends[choice].not_supported_reasons(**inputs)
            if reasons:
                raise BackendNotSupportedError(
                    f"{self.op}: backend {choice!r} cannot run these inputs: " + "; ".join(reasons)
                )
            return self.backends[choice]
        report = {}
        for name, b in self.backends.items():
            if device_type not in b.auto_devices:
                report[name] = [f"not selected automatically on {device_type}"]
                continue
            reasons = b.not_supported_reasons(**inputs)
            if not reasons:
                return b
            report[name] = reasons
        lines = "; ".join(f"{n}: {', '.join(r)}" for n, r in report.items())
        raise BackendNotSupportedError(f"{self.op}: no backend applies: {lines}")
