"""Triton kernels. Nothing here imports Triton at package import time: each kernel
module is imported lazily by its backend, so ``import fam_kernels`` never touches a
GPU driver."""

import os


def triton_unavailable_reason():
    """None when Triton can be imported, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def availability(device_type: str):
    """``Backend.availability`` of the Triton backends: None when they can run on
    ``device_type`` now, else why not (CPU tensors need the interpreter)."""
    why = triton_unavailable_reason()
    if why:
        return why
    if device_type == "cpu" and not interpreting():
        return "CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 before first use"
    return None
