"""Argument checks shared by the ops: each raises before any work, naming the
argument and the allowed values."""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, x, ndim: int, dims: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {dims}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_same_device_dtype(names: Sequence[str], tensors: Iterable[torch.Tensor]) -> None:
    tensors = list(tensors)
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {first.device}; move both to one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {names[0]} has {first.dtype}; use one dtype")


def is_real_number(value) -> bool:
    """The one rule for numeric arguments: a real number (int, float, numpy scalar),
    never a bool and never a string or tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real_in_range(name: str, value, lo: float, hi: float) -> float:
    """A real number (see :func:`is_real_number`) in [lo, hi], not NaN; returned as float.
    +inf passes only when ``hi`` is inf."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number in [{lo}, {hi}], got {value!r}")
    v = float(value)
    if not (lo <= v <= hi) or math.isnan(v):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return v


def check_finite_in_range(name: str, value, lo: float, hi: float = math.inf) -> float:
    """As :func:`check_real_in_range`, and finite."""
    v = check_real_in_range(name, value, lo, hi)
    if math.isinf(v):
        raise ValueError(f"{name} must be finite, in [{lo}, {hi}), got {value!r}")
    return v


def pair(name: str, value, *, integer: bool = False) -> tuple:
    """Accept a scalar or a length-2 sequence; return a 2-tuple."""
    if is_real_number(value):
        out = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        out = tuple(value)
    else:
        kind = "int" if integer else "number"
        raise TypeError(f"{name} must be a {kind} or a pair ({kind}, {kind}), got {value!r}")
    if integer and not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise TypeError(f"{name} must hold integers, got {value!r}")
    return out
