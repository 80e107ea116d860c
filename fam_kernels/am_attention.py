"""Attention Modulation (FAM eq. 6-7) in O(N) memory.

The paper's ``(lam * U(M^n) + (1 - lam) * M^m) V`` never forms an N x N map: with
U the nearest upsampling of both token axes divided by s_h * s_w,
``U(M^n) V = Up_q(M^n AvgPool(V))``, hence

    out = (1 - lam) * attention(Q, K, V) + lam * Up_q(attention(Q^n, K^n, AvgPool(V)))

Every backend computes this form: the native term once per native query, gathered
by the high-res queries (``csrc/include/fam/am_math.h`` holds the shared arithmetic).

Backends, in fixed priority order (``FAM_KERNELS_AM_BACKEND`` or ``backend=``
picks one explicitly):
  * ``triton`` -- one fused Triton kernel per pass (CUDA; CPU only through Triton's
    interpreter, ``TRITON_INTERPRET=1``, explicitly);
  * ``cpu``    -- the C++ flash-style kernel (``csrc/cpu/am_attention.cpp``), first on the
    CPU (faster than ``torch`` in benchmarks/results/am_attention.md);
  * ``torch``  -- two ``scaled_dot_product_attention`` calls, blended in place;
  * ``cuda``   -- the SIMT CUDA kernel (``csrc/cuda/am_attention.cu``): no tensor-core
    path, so last in the fixed order; measured dispatch times it with the others.

On CUDA the first call of a shape class times the applicable backends and keeps
the fastest; on the CPU the order above is used (bit-identical reruns);
``FAM_KERNELS_DISPATCH=fixed|measured`` overrides both: :mod:`fam_kernels.dispatch`.

Every backend returns the layout ``register_fake`` promises,
``torch.empty_like(q)``: the op copies a backend's result into it when they differ
(tests/kernels/test_am_attention.py checks it per backend on transposed, channels-last-like
and sliced inputs).

NaN and inf propagate as in the literal oracle on every backend. The one place the
identity form differs from it -- lam exactly 0 or 1 with inf in V, where the oracle's
zero weight never meets the inf (``0 * inf``) -- is handled once, for every backend,
by :func:`_zero_weight_with_nonfinite_v` (SDPA-based; checked with one read of V,
only at lam 0 or 1).

Meta tensors: :func:`am_attention` runs the allocation model of the fused kernels
(:func:`fam_kernels._am_grid.fused_forward`, the host code of the Triton backend and
of the compiled CUDA kernel, the default on CUDA) as plain aten calls, so a memory
tracer (a ``TorchDispatchMode`` counting live storages) sees every buffer the CUDA
run allocates -- unit-stride copies, AvgPool(V) (fp32, then cast), the fp32 native
term, the output and, when the promised layout has no unit feature stride, the
final copy -- and nothing more. No arithmetic runs on meta.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _checks
from ._am_grid import AmGrid, avg_pool_tokens, fused_forward, promised_layout, promised_strides
from ._ext import compiled_cpu_availability, compiled_cuda_availability
from .dispatch import Backend, Dispatcher, size_class
from .triton import availability as triton_availability

ENV_VAR = "FAM_KERNELS_AM_BACKEND"


# --------------------------------------------------------------------------- checks


def _check_inputs(q, k, v, q_lr, k_lr, lam, hr_size, lr_size, scale):
    """Validate everything before any work; return (lam, grid, scale)."""
    names = ("q", "k", "v", "q_lr", "k_lr")
    tensors = (q, k, v, q_lr, k_lr)
    for name, t in zip(names, tensors):
        _checks.check_tensor(name, t, 4, "(B, heads, tokens, head_dim)")
    _checks.check_same_device_dtype(names, tensors)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape (B, heads, N, d) = {tuple(q.shape)}, got {tuple(t.shape)}")
    if k_lr.shape != q_lr.shape:
        raise ValueError(f"k_lr must have q_lr's shape {tuple(q_lr.shape)}, got {tuple(k_lr.shape)}")
    B, heads, N, d = q.shape
    if (q_lr.shape[0], q_lr.shape[1], q_lr.shape[3]) != (B, heads, d):
        raise ValueError(
            f"q_lr must have q's batch, heads and head_dim (B={B}, heads={heads}, d={d}), "
            f"got shape {tuple(q_lr.shape)}"
        )
    H, W = _checks.pair("hr_size", hr_size, integer=True)
    h, w = _checks.pair("lr_size", lr_size, integer=True)
    for name, (a, b) in (("hr_size", (H, W)), ("lr_size", (h, w))):
        if a < 1 or b < 1:
            raise ValueError(f"{name} must be positive (rows, cols), got {(a, b)}")
    if N != H * W:
        raise ValueError(f"q has N={N} tokens but hr_size={H}x{W} holds {H * W}")
    if q_lr.shape[2] != h * w:
        raise ValueError(f"q_lr has {q_lr.shape[2]} tokens but lr_size={h}x{w} holds {h * w}")
    if h > H or w > W or H % h or W % w:
        raise ValueError(
            f"hr_size must be an integer multiple of lr_size on each axis (H = s_h*h, W = s_w*w, s >= 1), "
            f"got hr_size={H}x{W}, lr_size={h}x{w}"
        )
    lam = _checks.check_real_in_range("lam", lam, 0.0, 1.0)
    if scale is None:
        scale = d ** -0.5
    else:
        if not _checks.is_real_number(scale):
            raise TypeError(f"scale must be a positive real number or None, got {scale!r}")
        scale = float(scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number or None (d**-0.5), got {scale!r}")
    return lam, AmGrid(H, W, h, w), scale


# --------------------------------------------------------------------------- torch backend


def _sdpa(q, k, v, scale: float) -> torch.Tensor:
    """SDPA, with NaN rows where the query row holds NaN or inf: torch's CPU SDPA
    kernels return 0 for such rows, the oracle (softmax of NaN scores) NaN."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # A row sum is non-finite iff the row holds NaN/inf (or overflows fp32, where the
    # scores overflow too); (B, heads, N, 1) floats instead of an N x d mask.
    return out.masked_fill_(~q.sum(-1, keepdim=True, dtype=torch.float32).isfinite(), float("nan"))


def am_attention_torch(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    """The identity with two SDPA calls. The small native term is computed first;
    the high-res SDPA output is then blended in place, ``out * (1 - lam) + native *
    lam`` as the compiled kernels do, so the only N x d tensor is the output itself.
    Both terms are always computed (also at lam = 0 or 1) so that NaN propagates as
    in the oracle, where ``0 * NaN`` is NaN."""
    native = _sdpa(q_lr, k_lr, avg_pool_tokens(v, grid), scale)
    native_up = native.unflatten(2, (grid.h, 1, grid.w, 1))
    out = _sdpa(q, k, v, scale)
    tiles = out.unflatten(2, (grid.h, grid.s_h, grid.w, grid.s_w))
    # not lerp_: lerp computes start + w * (end - start), NaN when both are inf
    tiles.mul_(1.0 - lam).add_(native_up, alpha=lam)
    return out


def _zero_weight_with_nonfinite_v(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    """lam = 0 or 1 with inf/NaN in V. The oracle weights first, ``(lam U(M^n) + (1 -
    lam) M^m) V``: a zero-weighted term contributes its weights' NaN but never
    ``0 * inf``. Every kernel computes each term's product with V first, so the
    zero-weighted term is recomputed here on V with its non-finite values zeroed
    (what it contributes is then only NaN from its weights)."""
    finite = functools.partial(torch.nan_to_num, nan=0.0, posinf=0.0, neginf=0.0)
    if lam == 0.0:
        out = _sdpa(q, k, v, scale)
        ghost = _sdpa(q_lr, k_lr, finite(avg_pool_tokens(v, grid)), scale)
        out.unflatten(2, (grid.h, grid.s_h, grid.w, grid.s_w)).add_(ghost.unflatten(2, (grid.h, 1, grid.w, 1)),
                                                                  alpha=0.0)
        return out
    native = _sdpa(q_lr, k_lr, avg_pool_tokens(v, grid), scale).unflatten(2, (grid.h, 1, grid.w, 1))
    out = _sdpa(q, k, finite(v), scale)
    out.unflatten(2, (grid.h, grid.s_h, grid.w, grid.s_w)).mul_(0.0).add_(native)
    return out


# --------------------------------------------------------------------------- compiled backends


def _compiled_op(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    return torch.ops.fam_C.am_attention(q, k, v, q_lr, k_lr, lam, grid.H, grid.W, grid.h, grid.w, scale)


def _triton(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    from .triton.am_attention import am_attention_triton

    return am_attention_triton(q, k, v, q_lr, k_lr, lam, grid, scale)


DISPATCHER = Dispatcher(
    "am_attention",
    ENV_VAR,
    [
        Backend("triton", _triton, devices=("cuda", "cpu"), auto_devices=("cuda",), max_head_dim=256,
                availability=triton_availability),
        Backend("cpu", _compiled_op, devices=("cpu",), auto_devices=("cpu",), availability=compiled_cpu_availability),
        Backend("torch", am_attention_torch, devices=None, auto_devices=None),  # plain torch: any device
        Backend("cuda", _compiled_op, devices=("cuda",), auto_devices=("cuda",), max_head_dim=128,
                availability=compiled_cuda_availability),
    ],
)


def shape_class(q: torch.Tensor, q_lr: torch.Tensor, grid: AmGrid) -> tuple:
    """Shapes sharing a measured winner: powers of two of batch*heads and both token
    counts, the exact head dim."""
    B, heads, N, d = q.shape
    return (size_class(B * heads), size_class(N), size_class(q_lr.shape[2]), d)


# --------------------------------------------------------------------------- registered op


@torch.library.custom_op("fam_kernels::am_attention", mutates_args=())
def _am_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lr: torch.Tensor, k_lr: torch.Tensor,
                     lam: float, hr_h: int, hr_w: int, lr_h: int, lr_w: int, scale: float,
                     backend: str | None) -> torch.Tensor:
    grid = AmGrid(hr_h, hr_w, lr_h, lr_w)
    if lam in (0.0, 1.0) and not bool(torch.isfinite(v).all()):  # rare: one read of V, only at lam 0 or 1
        DISPATCHER.select(backend, q.device.type, q.dtype, q.shape[-1])  # an explicit choice is still checked
        out = _zero_weight_with_nonfinite_v(q, k, v, q_lr, k_lr, lam, grid, scale)
        return promised_layout(q).copy_(out)

    def call(b: Backend) -> torch.Tensor:
        out = b.run(q, k, v, q_lr, k_lr, lam, grid, scale)
        if out.stride() != promised_strides(q):  # the layout register_fake promises
            out = promised_layout(q).copy_(out)
        return out

    return DISPATCHER.run(backend, shape_class(q, q_lr, grid), call, device_type=q.device.type, dtype=q.dtype,
                          head_dim=q.shape[-1])


@_am_attention_op.register_fake
def _(q, k, v, q_lr, k_lr, lam, hr_h, hr_w, lr_h, lr_w, scale, backend):
    return promised_layout(q)


def _meta_model(q, k, v, q_lr, k_lr, grid: AmGrid) -> torch.Tensor:
    """The CUDA default's allocations on meta tensors (see the module docstring):
    the Triton backend's host code with its two launches left out."""
    return fused_forward(q, k, v, q_lr, k_lr, grid)


def am_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lr: torch.Tensor, k_lr: torch.Tensor, *,
                 lam: float, hr_size, lr_size, scale: float | None = None, backend: str | None = None
                 ) -> torch.Tensor:
    """Attention Modulation: ``(lam * U(M^n) + (1 - lam) * M^m) V`` in O(N) memory.

    q, k, v: (B, heads, N, d) high-res self-attention inputs, N = H*W tokens of a
    row-major ``hr_size = (H, W)`` grid; q_lr, k_lr: (B, heads, n, d) the same layer's
    native queries and keys on ``lr_size = (h, w)``, H = s_h*h and W = s_w*w.
    ``scale`` defaults to d**-0.5; ``lam`` in [0, 1]. Returns (B, heads, N, d) in the
    input dtype (fp32 accumulation), laid out as ``torch.empty_like(q)``.
    ``backend``: "auto" / None or one of :data:`DISPATCHER`'s names. Meta tensors
    run the CUDA default's allocation model (module docstring).
    """
    lam, grid, scale = _check_inputs(q, k, v, q_lr, k_lr, lam, hr_size, lr_size, scale)
    DISPATCHER.requested(backend)  # unknown names fail here, before any work
    if q.device.type == "meta":
        return _meta_model(q, k, v, q_lr, k_lr, grid)
    return _am_attention_op(q, k, v, q_lr, k_lr, lam, grid.H, grid.W, grid.h, grid.w, scale, backend)


__all__ = ["am_attention", "am_attention_torch", "AmGrid", "avg_pool_tokens", "DISPATCHER", "ENV_VAR"]
