"""Triton kernels. Nothing here imports Triton at package import time: each kernel
module is imported lazily by its backend, so ``import fam_kernels`` never touches a
GPU driver."""


def triton_unavailable_reason():
    """None when Triton can be imported, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "") == "1"
