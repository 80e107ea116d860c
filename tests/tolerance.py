"""Accuracy checks in flash-attention's style: a backend run at a low precision must
be about as close to a float64 oracle as plain torch at that same precision is."""

from __future__ import annotations

import torch


def _describe_mismatch(out: torch.Tensor, oracle: torch.Tensor, bound: float) -> str:
    diff = (out.double() - oracle.double()).abs()
    nan_mismatch = torch.isnan(out.double()) != torch.isnan(oracle.double())
    bad = (diff > bound) | nan_mismatch
    idx = bad.nonzero()[:5].tolist()
    parts = [f"{tuple(i)}: got {out[tuple(i)].item():.6g}, want {oracle[tuple(i)].item():.6g}" for i in idx]
    return f"{int(bad.sum())} of {out.numel()} elements off (bound {bound:.3g}); first: " + "; ".join(parts)


def max_abs_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    return (out.double() - oracle.double()).abs().nan_to_num(0.0).max().item()


def assert_matches_oracle(out: torch.Tensor, oracle: torch.Tensor, torch_same_dtype: torch.Tensor | None = None,
                          *, factor: float = 2.0, floor: float | None = None) -> None:
    """``out`` is within ``factor * err(torch at that dtype) + floor`` of ``oracle``.

    With ``torch_same_dtype`` None, the bound is ``floor`` alone (default: a few ulps
    of the output dtype relative to the oracle's magnitude).
    """
    assert out.shape == oracle.shape, f"shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}"
    scale = max(oracle.double().abs().nan_to_num(0.0).max().item(), 1.0)
    if floor is None:
        floor = 4 * torch.finfo(out.dtype).eps * scale
    bound = floor if torch_same_dtype is None else factor * max_abs_err(torch_same_dtype, oracle) + floor
    nan_ok = torch.equal(torch.isnan(out), torch.isnan(oracle))
    err = max_abs_err(out, oracle)
    assert nan_ok and err <= bound, _describe_mismatch(out, oracle, bound)
