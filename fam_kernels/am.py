"""Attention Modulation (FAM eq. 6-7) in O(N) memory.

The paper's ``(lam * U(M^n) + (1 - lam) * M^m) V`` never forms an N x N map: with
U the nearest upsampling of both token axes divided by s_h * s_w,
``U(M^n) V = Up_q(M^n AvgPool(V))``, hence

    out = (1 - lam) * attention(Q, K, V) + lam * Up_q(attention(Q^n, K^n, AvgPool(V)))

Every backend computes this form: the native term once per native query, gathered
by the high-res queries (``csrc/include/fam/am_math.h`` holds the shared arithmetic).

Backends, in automatic priority order (``FAM_KERNELS_AM_BACKEND`` or ``backend=``
picks one explicitly):
  * ``triton`` -- one fused Triton kernel per pass (CUDA; CPU only through Triton's
    interpreter, ``TRITON_INTERPRET=1``, explicitly);
  * ``cpu``    -- the C++ flash-style kernel (``csrc/cpu/am_attention.cpp``), the CPU
    default because it is faster than ``torch`` there (benchmarks/results/am_attention.md);
  * ``torch``  -- two ``scaled_dot_product_attention`` calls, blended in place;
  * ``cuda``   -- the SIMT CUDA kernel (``csrc/cuda/am_attention.cu``), explicit only:
    it has no tensor-core path, so it is not expected to beat ``triton`` or ``torch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

from . import _checks
from ._backend_reasons import compiled_cpu_reasons, compiled_cuda_reasons, triton_reasons
from .dispatch import Backend, Dispatcher

ENV_VAR = "FAM_KERNELS_AM_BACKEND"
MAX_HEAD_DIM = {"cuda": 128, "triton": 256}


@dataclass(frozen=True)
class AmGrid:
    """A row-major high-res (H, W) token grid over a native (h, w) grid."""

    H: int
    W: int
    h: int
    w: int

    @property
    def s_h(self) -> int:
        return self.H // self.h

    @property
    def s_w(self) -> int:
        return self.W // self.w


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
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a positive real number or None, got {scale!r}") from None
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number or None (d**-0.5), got {scale!r}")
    return lam, AmGrid(H, W, h, w), scale


# --------------------------------------------------------------------------- torch backend


def avg_pool_tokens(v: torch.Tensor, grid: AmGrid) -> torch.Tensor:
    """AvgPool_{s_h, s_w} over the key grid of (B, heads, H*W, d) -> (B, heads, h*w, d), fp32 sums."""
    tiles = v.unflatten(2, (grid.h, grid.s_h, grid.w, grid.s_w))
    return tiles.mean(dim=(3, 5), dtype=torch.float32).to(v.dtype).flatten(2, 3)


def am_attention_torch(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    """The identity with two SDPA calls. The small native term is computed first;
    the high-res SDPA output is then blended in place (one lerp, fp32 arithmetic),
    so the only N x d tensor is the output itself."""
    B, heads, N, d = q.shape
    native_up = None
    if lam > 0.0:
        native = F.scaled_dot_product_attention(q_lr, k_lr, avg_pool_tokens(v, grid), scale=scale)
        native_up = native.unflatten(2, (grid.h, 1, grid.w, 1))
    if lam == 1.0:
        tiles = native_up.expand(B, heads, grid.h, grid.s_h, grid.w, grid.s_w, d)
        return torch.empty_like(q).copy_(tiles.reshape(B, heads, N, d))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if out.stride() != torch.empty_like(q, device="meta").stride():  # the layout register_fake promises
        out = torch.empty_like(q).copy_(out)
    if native_up is not None:
        out.unflatten(2, (grid.h, grid.s_h, grid.w, grid.s_w)).lerp_(native_up, lam)
    return out


# --------------------------------------------------------------------------- compiled backends


def _compiled_op(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    return torch.ops.fam_C.am_attention(q, k, v, q_lr, k_lr, lam, grid.H, grid.W, grid.h, grid.w, scale)


def _triton(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    from .triton.am_attention import am_attention_triton

    return am_attention_triton(q, k, v, q_lr, k_lr, lam, grid, scale)


def _head_dim_reasons(backend: str, head_dim: int) -> List[str]:
    limit = MAX_HEAD_DIM.get(backend)
    return [f"head_dim must be <= {limit}, got {head_dim}"] if limit is not None and head_dim > limit else []


def _cpu_reasons(device: str, head_dim: int) -> List[str]:
    return compiled_cpu_reasons(device) + _head_dim_reasons("cpu", head_dim)


def _cuda_reasons(device: str, head_dim: int) -> List[str]:
    return compiled_cuda_reasons(device) + _head_dim_reasons("cuda", head_dim)


def _triton_reasons(device: str, head_dim: int) -> List[str]:
    return triton_reasons(device) + _head_dim_reasons("triton", head_dim)


DISPATCHER = Dispatcher(
    "am_attention",
    ENV_VAR,
    [
        Backend("triton", _triton, _triton_reasons, auto_devices=("cuda",)),
        Backend("cpu", _compiled_op, _cpu_reasons, auto_devices=("cpu",)),
        Backend("torch", am_attention_torch, lambda device, head_dim: []),
        Backend("cuda", _compiled_op, _cuda_reasons, auto_devices=()),
    ],
)



@torch.compiler.assume_constant_result
def choose_backend(backend: str | None, device_type: str, head_dim: int) -> str:
    """The backend's name (constant under torch.compile: selection reads the
    environment and the extension's state, never tensors)."""
    return DISPATCHER.select(backend, device_type, device=device_type, head_dim=head_dim).name


# --------------------------------------------------------------------------- registered op


@torch.library.custom_op("fam_kernels::am_attention", mutates_args=())
def _am_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lr: torch.Tensor, k_lr: torch.Tensor,
                     lam: float, hr_h: int, hr_w: int, lr_h: int, lr_w: int, scale: float,
                     backend: str) -> torch.Tensor:
    grid = AmGrid(hr_h, hr_w, lr_h, lr_w)
    return DISPATCHER.backends[backend].run(q, k, v, q_lr, k_lr, lam, grid, scale)


@_am_attention_op.register_fake
def _(q, k, v, q_lr, k_lr, lam, hr_h, hr_w, lr_h, lr_w, scale, backend):
    return torch.empty_like(q)


def am_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lr: torch.Tensor, k_lr: torch.Tensor, *,
                 lam: float, hr_size, lr_size, scale: float | None = None, backend: str | None = None
                 ) -> torch.Tensor:
    """Attention Modulation: ``(lam * U(M^n) + (1 - lam) * M^m) V`` in O(N) memory.

    q, k, v: (B, heads, N, d) high-res self-attention inputs, N = H*W tokens of a
    row-major ``hr_size = (H, W)`` grid; q_lr, k_lr: (B, heads, n, d) the same layer's
    native queries and keys on ``lr_size = (h, w)``, H = s_h*h and W = s_w*w.
    ``scale`` defaults to d**-0.5; ``lam`` in [0, 1]. Returns (B, heads, N, d) in the
    input dtype (fp32 accumulation). ``backend``: "auto" / None or one of
    :data:`DISPATCHER`'s names.
    """
    lam, grid, scale = _check_inputs(q, k, v, q_lr, k_lr, lam, hr_size, lr_size, scale)
    chosen = choose_backend(backend, q.device.type, q.shape[-1])
    return _am_attention_op(q, k, v, q_lr, k_lr, lam, grid.H, grid.W, grid.h, grid.w, scale, chosen)
