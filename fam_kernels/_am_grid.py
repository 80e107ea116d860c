"""The token grids of Attention Modulation, shared by its dispatcher and every
backend (torch, Triton, the meta model): a row-major high-res (H, W) grid over a
native (h, w) grid, and the AvgPool of the keys' values onto the native grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def avg_pool_tokens(v: torch.Tensor, grid: AmGrid) -> torch.Tensor:
    """AvgPool_{s_h, s_w} over the key grid of (B, heads, H*W, d) -> (B, heads, h*w, d), fp32 sums."""
    tiles = v.unflatten(2, (grid.h, grid.s_h, grid.w, grid.s_w))
    return tiles.mean(dim=(3, 5), dtype=torch.float32).to(v.dtype).flatten(2, 3)


def unit_feature_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last (feature) axis has stride 1, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def promised_layout(like: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``like``'s shape and dtype in the layout the op's
    ``register_fake`` promises: ``torch.empty_like(like)`` (dense inputs keep their
    dimension order; others get the contiguous one)."""
    return torch.empty_like(like)


def promised_strides(like: torch.Tensor) -> tuple:
    """The strides of :func:`promised_layout` (like), computed on the meta device with
    any TorchDispatchMode (a memory tracer) switched off: a query, not an allocation."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return torch.empty_like(like, device="meta").stride()


def fused_forward(q, k, v, q_lr, k_lr, grid: AmGrid, native_pass=None, high_res_pass=None) -> torch.Tensor:
    """The host side of the fused two-pass kernels, shared by the Triton backend (which
    passes its two kernel launches) and the meta model (which passes none), so that
    both allocate exactly this, in this order:

    1. a contiguous copy of any input whose feature stride is not 1;
    2. the native term, fp32 (B, heads, n, d);
    3. AvgPool(V): fp32 means cast to the input dtype, released after the native pass;
    4. the output, written by the high-res pass: the promised layout when its feature
       stride is 1, else a contiguous buffer copied into the promised layout.

    ``native_pass(q_lr, k_lr, v_pool, native)`` and ``high_res_pass(q, k, v, native, out)``
    launch the kernels. Returns the output in the promised layout.
    """
    original_q = q
    q, k, v, q_lr, k_lr = (unit_feature_stride(x) for x in (q, k, v, q_lr, k_lr))
    B, heads, _, d = q.shape
    native = torch.empty((B, heads, q_lr.shape[2], d), device=q.device, dtype=torch.float32)
    v_pool = avg_pool_tokens(v, grid)
    if native_pass is not None:
        native_pass(q_lr, k_lr, v_pool, native)
    del v_pool
    promised = promised_strides(original_q)
    if promised[-1] == 1:
        out = promised_layout(original_q)
    else:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if high_res_pass is not None:
        high_res_pass(q, k, v, native, out)
    del native
    if out.stride() != promised:
        out = promised_layout(original_q).copy_(out)
    return out
