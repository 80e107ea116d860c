"""Frequency Modulation (paper eq. 4-5): ``lowpass_blend(z, z_ref, cutoff, gain)``.

    out = z + gain * LP(z_ref - z)

per (B, C) plane, LP keeping the centred 2-D frequencies with 2|k_y| < cutoff[0]
and 2|k_x| < cutoff[1] (the band and its real basis: :mod:`fam_kernels._lowpass_basis`).
With ``cutoff, gain = fm_schedule(t, T, H, W)`` this is the paper's f_t(z_ref, z).

Backends (dispatcher, env var ``FAM_KERNELS_LOWPASS_BACKEND`` or ``backend=``):
``cuda`` (csrc/cuda, cuBLAS GEMMs around fused fold/blend kernels), ``triton``
(four launches of one GEMM kernel with the difference fused into the first and
the blend into the last; automatic only on CUDA, explicit on the CPU under
``TRITON_INTERPRET=1``), ``cpu`` (csrc/cpu, first on the CPU) and ``torch``.
The torch and cpu backends pick per call the cheaper of two forms: low-rank GEMMs
with the band basis (narrow bands) or FFTs restricted to the band (wide bands).
On CUDA the first call of a shape class times the applicable backends and keeps the
fastest; on the CPU the order above is used (bit-identical reruns);
``FAM_KERNELS_DISPATCH=fixed|measured`` overrides both: :mod:`fam_kernels.dispatch`.

Meta tensors: :func:`lowpass_blend` runs the allocation model of the CUDA default
(the compiled ``cuda`` backend: ``lowpass_blend_lowrank_pipeline`` in
csrc/cpu/lowpass_blend.cpp with its CUDA stages) as plain aten calls -- the
contiguous output, the (P*H, W) fp32 fold workspace, the (P*H, rank_w) fp32
coefficients, the four small (P, H | rank_h, rank_w) fp32 stage buffers, all alive
until the op returns, and the two axes' band bases (cached per device, as on
CUDA) -- so a memory tracer sees what the CUDA run allocates. No arithmetic runs.

Special cases:
* ``gain == 0`` or an empty band (cutoff <= 0 on an axis): the result is an exact
  copy of ``z``; the reference contributes nothing by definition, so NaN/Inf in
  ``z_ref`` are not propagated.
* Otherwise a NaN/Inf in ``z_ref - z`` reaches every coefficient of the band of its
  plane, so the whole (b, c) plane becomes NaN -- as in the literal FFT reference;
  other planes are untouched.
* A band covering the whole spectrum makes LP the identity (gain 1 gives z_ref up
  to rounding); ``cutoff = inf`` is such a band (2|k| < inf keeps every frequency),
  as in the reference.

The op is registered as ``torch.ops.fam_kernels.lowpass_blend`` (torch.compile
traces it without graph breaks) with autograd: it is linear, so
grad_z_ref = gain * LP(g) and grad_z = g - grad_z_ref.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _lowpass_basis as basis
from ._checks import check_real_in_range, check_same_device_dtype, check_tensor, is_real_number, pair
from ._ext import compiled_cpu_availability, compiled_cuda_availability
from .dispatch import Backend, Dispatcher, size_class
from .schedule import fm_schedule  # noqa: F401  (public: lowpass_blend's schedule)
from .triton import availability as triton_availability

ENV_VAR = "FAM_KERNELS_LOWPASS_BACKEND"

# --------------------------------------------------------------------------- torch


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _torch_lowrank(z, z_ref, kept_h: int, kept_w: int, gain: float) -> torch.Tensor:
    """z + gain * B_h B_h^T D B_w B_w^T with the plain (n, rank) bases."""
    B, C, H, W = z.shape
    b_h = basis.band_basis(H, kept_h, z.device).full
    b_w = basis.band_basis(W, kept_w, z.device).full
    diff = (_as_float(z_ref) - _as_float(z)).reshape(-1, W)
    coeffs = (diff @ b_w).view(B * C, H, -1)
    lp_coeffs = b_h @ (b_h.t() @ coeffs)
    out = torch.addmm(_as_float(z).reshape(-1, W), lp_coeffs.view(-1, b_w.shape[1]), b_w.t(), alpha=gain)
    return out.view(B, C, H, W).to(z.dtype)


def _torch_spectral(z, z_ref, kept_h: int, kept_w: int, gain: float) -> torch.Tensor:
    """rfft along W keeping the band's bins, FFT along H masked to the band, inverse."""
    H, W = z.shape[-2:]
    band = torch.fft.rfft(_as_float(z_ref) - _as_float(z), dim=-1)[..., :kept_w]
    mask = basis.fft_band_mask(H, kept_h, z.device)
    band = torch.fft.ifft(torch.fft.fft(band, dim=-2) * mask, dim=-2)
    lowpassed = torch.fft.irfft(F.pad(band, (0, W // 2 + 1 - kept_w)), n=W, dim=-1)
    return torch.add(_as_float(z), lowpassed, alpha=gain).to(z.dtype).contiguous()


def _run_torch(z, z_ref, kept_h, kept_w, gain):
    H, W = z.shape[-2:]
    lowrank = basis.prefer_lowrank(H, W, basis.band_rank(H, kept_h), basis.band_rank(W, kept_w), "torch")
    return (_torch_lowrank if lowrank else _torch_spectral)(z, z_ref, kept_h, kept_w, gain)


# --------------------------------------------------------------------------- compiled


def _folded_bases(z, kept_h, kept_w):
    H, W = z.shape[-2:]
    b_h = basis.band_basis(H, kept_h, z.device)
    b_w = basis.band_basis(W, kept_w, z.device)
    return b_h.cos_folded, b_h.sin_folded, b_w.cos_folded, b_w.sin_folded


def _run_cpu(z, z_ref, kept_h, kept_w, gain):
    H, W = z.shape[-2:]
    ops = torch.ops.fam_C
    if basis.prefer_lowrank(H, W, basis.band_rank(H, kept_h), basis.band_rank(W, kept_w), "cpu"):
        return ops.lowpass_blend_lowrank(z, z_ref, *_folded_bases(z, kept_h, kept_w), gain)
    return ops.lowpass_blend_spectral(z, z_ref, basis.fft_band_mask(H, kept_h, z.device), kept_w, gain)


def _run_cuda(z, z_ref, kept_h, kept_w, gain):
    return torch.ops.fam_C.lowpass_blend_lowrank(z, z_ref, *_folded_bases(z, kept_h, kept_w), gain)


def _run_triton(z, z_ref, kept_h, kept_w, gain):
    from .triton.lowpass_blend import lowpass_blend_triton

    H, W = z.shape[-2:]
    b_h = basis.band_basis(H, kept_h, z.device).full
    b_w = basis.band_basis(W, kept_w, z.device).full
    return lowpass_blend_triton(z, z_ref, b_h, b_w, gain)


# --------------------------------------------------------------------------- meta


def _meta_model(z, kept_h: int, kept_w: int) -> torch.Tensor:
    """The compiled CUDA backend's allocations, in its order (see the module docstring)."""
    P, (H, W) = z.shape[0] * z.shape[1], z.shape[-2:]
    cos_h, sin_h, cos_w, sin_w = _folded_bases(z, kept_h, kept_w)
    rank_w = cos_w.shape[1] + sin_w.shape[1]
    f32 = dict(device=z.device, dtype=torch.float32)
    out = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    workspace = [torch.empty(P * H, W, **f32), torch.empty(P * H, rank_w, **f32)]  # folded, coeffs
    workspace.append(torch.empty(P, H, rank_w, **f32))  # folded_h
    workspace += [torch.empty(P, cos_h.shape[1], rank_w, **f32), torch.empty(P, sin_h.shape[1], rank_w, **f32)]
    workspace += [torch.empty(P, H, rank_w, **f32), torch.empty(P, H, rank_w, **f32)]  # synth_h, lowpassed
    del workspace
    return out


# --------------------------------------------------------------------------- dispatch


DISPATCHER = Dispatcher(
    "lowpass_blend",
    ENV_VAR,
    [
        Backend("cuda", _run_cuda, devices=("cuda",), auto_devices=("cuda",), availability=compiled_cuda_availability),
        Backend("triton", _run_triton, devices=("cuda", "cpu"), auto_devices=("cuda",),
                availability=triton_availability),
        Backend("cpu", _run_cpu, devices=("cpu",), auto_devices=("cpu",), availability=compiled_cpu_availability),
        Backend("torch", _run_torch, devices=None, auto_devices=None),  # plain torch: any device
    ],
)


def shape_class(z: torch.Tensor, kept_h: int, kept_w: int) -> tuple:
    """Shapes sharing a measured winner: powers of two of planes, sizes and band widths."""
    B, C, H, W = z.shape
    return tuple(size_class(n) for n in (B * C, H, W, kept_h, kept_w))


# --------------------------------------------------------------------------- op


def _band(z: torch.Tensor, cutoff_h: float, cutoff_w: float, gain: float):
    """(kept_h, kept_w), or None when the result is a copy of z (no gain or an empty band)."""
    H, W = z.shape[-2:]
    kept_h, kept_w = basis.kept_bins(H, cutoff_h), basis.kept_bins(W, cutoff_w)
    if gain == 0.0 or kept_h == 0 or kept_w == 0:
        return None
    return kept_h, kept_w


@torch.library.custom_op("fam_kernels::lowpass_blend", mutates_args=())
def _lowpass_blend_op(z: torch.Tensor, z_ref: torch.Tensor, cutoff_h: float, cutoff_w: float, gain: float,
                      backend: Optional[str]) -> torch.Tensor:
    band = _band(z, cutoff_h, cutoff_w, gain)
    if band is None:
        DISPATCHER.select(backend, z.device.type, z.dtype)  # an explicit choice is still checked
        return z.clone(memory_format=torch.contiguous_format)

    def call(b: Backend) -> torch.Tensor:
        out = b.run(z, z_ref, *band, gain)
        return out if out.is_contiguous() else out.contiguous()  # the layout register_fake promises

    return DISPATCHER.run(backend, shape_class(z, *band), call, device_type=z.device.type, dtype=z.dtype)


@_lowpass_blend_op.register_fake
def _(z, z_ref, cutoff_h, cutoff_w, gain, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, _, ctx.cutoff_h, ctx.cutoff_w, ctx.gain, ctx.backend = inputs


def _backward(ctx, grad):
    grad_z_ref = _lowpass_blend_op(torch.zeros_like(grad), grad, ctx.cutoff_h, ctx.cutoff_w, ctx.gain, ctx.backend)
    return grad - grad_z_ref, grad_z_ref, None, None, None, None


_lowpass_blend_op.register_autograd(_backward, setup_context=_setup_context)


def _check_cutoff(cutoff) -> Tuple[float, float]:
    """A number >= 0 or a pair of them; +inf is the full band (2|k| < inf keeps all)."""
    values = pair("cutoff", cutoff)
    out = []
    for v in values:
        if not is_real_number(v):
            raise TypeError(f"cutoff must be a number >= 0 (inf: the full band) or a pair of them, got {cutoff!r}")
        if math.isnan(v) or v < 0:
            raise ValueError(f"cutoff must be >= 0 (not NaN; inf: the full band) on both axes, got {cutoff!r}")
        out.append(float(v))
    return out[0], out[1]


def lowpass_blend(z: torch.Tensor, z_ref: torch.Tensor, cutoff, gain: float, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``z + gain * LP(z_ref - z)`` on the last two axes of (B, C, H, W) tensors.

    Args:
        z, z_ref: (B, C, H, W) float32/float16/bfloat16 tensors of one shape, device
            and dtype (any strides). Computed in float32, returned in their dtype.
        cutoff: box size on the centred spectrum, a number or (cutoff_h, cutoff_w);
            frequencies with 2|k| < cutoff are kept. 0 keeps nothing, inf everything.
        gain: weight in [0, 1] of the reference's low frequencies.
        backend: "auto" (default), "cuda", "triton", "cpu" or "torch".

    Returns a new contiguous tensor (never ``z`` itself). Meta tensors run the CUDA
    default's allocation model (module docstring).
    """
    check_tensor("z", z, 4, "(B, C, H, W)")
    check_tensor("z_ref", z_ref, 4, "(B, C, H, W)")
    if z_ref.shape != z.shape:
        raise ValueError(f"z_ref must have z's shape {tuple(z.shape)}, got {tuple(z_ref.shape)}")
    check_same_device_dtype(("z", "z_ref"), (z, z_ref))
    cutoff_h, cutoff_w = _check_cutoff(cutoff)
    gain = check_real_in_range("gain", gain, 0.0, 1.0)
    DISPATCHER.requested(backend)  # unknown names fail here, before any work
    if z.device.type == "meta":
        band = _band(z, cutoff_h, cutoff_w, gain)
        return z.clone(memory_format=torch.contiguous_format) if band is None else _meta_model(z, *band)
    return _lowpass_blend_op(z, z_ref, cutoff_h, cutoff_w, gain, backend)


__all__ = ["lowpass_blend", "fm_schedule", "DISPATCHER", "ENV_VAR"]
