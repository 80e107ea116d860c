"""Tolerant loading of the compiled extension ``fam_kernels._C``.

A missing or broken build never breaks ``import fam_kernels``: it logs one warning
and the backends that need the extension report why they do not apply.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

logger = logging.getLogger("fam_kernels")

_SKIP_ENV = "FAM_KERNELS_SKIP_BUILD"


@functools.lru_cache(maxsize=None)
def _load():
    """Return (module, None) or (None, reason). Cached: the warning is emitted once."""
    try:
        module = importlib.import_module("fam_kernels._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError
        if os.environ.get(_SKIP_ENV):
            reason = f"compiled extension not built ({_SKIP_ENV} is set)"
        else:
            reason = f"compiled extension fam_kernels._C unavailable: {type(exc).__name__}: {exc}"
        logger.warning("fam_kernels: %s; using the pure-torch backends instead", reason)
        return None, reason
    return module, None


def extension():
    """The loaded ``fam_kernels._C`` module, or None."""
    return _load()[0]


def extension_unavailable_reason() -> str | None:
    """Why the extension cannot be used, or None when it loaded."""
    return _load()[1]


def has_cuda_kernels() -> bool:
    module = extension()
    return bool(module is not None and module.with_cuda())


# Availability checks used as ``Backend.availability`` (fam_kernels.dispatch).


def compiled_cpu_availability(device_type: str) -> str | None:
    return extension_unavailable_reason()


def compiled_cuda_availability(device_type: str) -> str | None:
    if has_cuda_kernels():
        return None
    return extension_unavailable_reason() or "fam_kernels._C was built without CUDA kernels"
