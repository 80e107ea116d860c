"""Why a compiled or Triton backend cannot run on a device: the checks every op's
dispatcher shares (op-specific limits, such as head sizes, are added by the op)."""

from __future__ import annotations

from typing import List

from ._ext import extension_unavailable_reason, has_cuda_kernels
from .triton import interpreting, triton_unavailable_reason


def compiled_cpu_reasons(device_type: str) -> List[str]:
    reasons = []
    if device_type != "cpu":
        reasons.append(f"needs CPU tensors, got {device_type}")
    why = extension_unavailable_reason()
    if why:
        reasons.append(why)
    return reasons


def compiled_cuda_reasons(device_type: str) -> List[str]:
    reasons = []
    if device_type != "cuda":
        reasons.append(f"needs CUDA tensors, got {device_type}")
    if not has_cuda_kernels():
        reasons.append(extension_unavailable_reason() or "fam_kernels._C was built without CUDA kernels")
    return reasons


def triton_reasons(device_type: str) -> List[str]:
    reasons = []
    why = triton_unavailable_reason()
    if why:
        reasons.append(why)
    if device_type == "cpu" and not interpreting():
        reasons.append("CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 before first use")
    elif device_type not in ("cpu", "cuda"):
        reasons.append(f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device_type}")
    return reasons
