"""Triton forward kernel of Attention Modulation (math: :mod:`fam_kernels.am_attention`).

One kernel, launched twice per call:
  1. native pass: attention(Q^n, K^n, AvgPool(V)) for every native query, written
     as fp32 (B, heads, n, d) -- 1/(s_h s_w) of the output's size;
  2. high-res pass (BLEND): flash attention over the high-res keys for a block of
     queries; the epilogue normalises, gathers each query's native row from pass 1
     and blends with lam.
The native term is computed once per native query and gathered rather than
recomputed inside the high-res pass: recomputing it for every high-res query block
costs N * n * d (1/(s_h s_w) of the high-res attention, 25% at 2x) against
n * n * d (1/(s_h s_w)^2, 6.25% at 2x), for one extra d-row read per query.
AvgPool(V) is a small torch reduction (1/(s_h s_w) of V): fusing it into the
native pass's key loop costs registers (ptxas spills at d = 128) for a pass that
is already the cheap one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._am_grid import AmGrid, fused_forward
from . import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _am_attention_fwd(
    Q, K, V, NATIVE, OUT,
    sq_b, sq_h, sq_n,
    sk_b, sk_h, sk_n,
    sv_b, sv_h, sv_n,
    so_b, so_h, so_n,
    heads, n_q, n_k,
    qk_scale_log2, lam,
    W, w, s_h, s_w,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLEND: tl.constexpr, IEEE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pair = tl.program_id(1)
    b = pair // heads
    hd = pair % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < HEAD_DIM

    q = tl.load(Q + b * sq_b + hd * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * sk_b + hd * sk_h
    v_base = V + b * sv_b + hd * sv_h

    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < n_k)[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where((offs_n < n_k)[None, :], s * qk_scale_log2, float("-inf"))
        # online softmax in base 2 (scores carry scale * log2(e))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
        m_i = m_new

    result = acc / l_i[:, None]
    out_mask = mask_m[:, None] & mask_d[None, :]
    if BLEND:
        # native token of high-res token i under nearest upsampling
        parent = (offs_m // W // s_h) * w + (offs_m % W) // s_w
        n_native = n_k // (s_h * s_w)
        native = tl.load(NATIVE + (pair * n_native + parent[:, None]) * HEAD_DIM + offs_d[None, :],
                         mask=out_mask, other=0.0)
        result = result * (1.0 - lam) + native * lam
    tl.store(OUT + b * so_b + hd * so_h + offs_m[:, None] * so_n + offs_d[None, :],
             result.to(OUT.dtype.element_ty), mask=out_mask)


def block_d(head_dim: int) -> int:
    """Feature block: the head dim padded to a power of two (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def default_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options; sm_80/sm_90 compile them without spills
    (tests/kernels/test_am_triton.py). fp32 runs true-fp32 dots (no tensor cores), which
    needs smaller tiles."""
    wide = block_d(head_dim) > 64
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 16 if wide else 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 2}


def _dot_dtype(dtype: torch.dtype):
    """tl.dot operand type: the input's, except bf16 under the interpreter (no bf16
    arithmetic on the CPU), which is upcast to fp32."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _attention_pass(q, k, v, native, out, grid: AmGrid, lam: float, scale: float, *, blend: bool) -> None:
    B, heads, n_q, d = q.shape
    cfg = default_config(d, q.dtype)
    _am_attention_fwd[(triton.cdiv(n_q, cfg["BLOCK_M"]), B * heads)](
        q, k, v, native, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, n_q, k.shape[2],
        scale * LOG2E, lam,
        grid.W, grid.w, grid.s_h, grid.s_w,
        HEAD_DIM=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(d),
        BLEND=blend, IEEE_DOT=q.dtype == torch.float32, DOT_DTYPE=_dot_dtype(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def am_attention_triton(q, k, v, q_lr, k_lr, lam: float, grid: AmGrid, scale: float) -> torch.Tensor:
    """Host code (allocations, layouts) shared with the meta model: fused_forward."""

    def native_pass(q_lr, k_lr, v_pool, native):
        _attention_pass(q_lr, k_lr, v_pool, native, native, grid, lam, scale, blend=False)

    def high_res_pass(q, k, v, native, out):
        _attention_pass(q, k, v, native, out, grid, lam, scale, blend=True)

    return fused_forward(q, k, v, q_lr, k_lr, grid, native_pass, high_res_pass)


def aot_signature(dtype: str, blend: bool):
    """(signature, flag constexprs) of one pass, for :func:`fam_kernels.triton.aot.compile_kernel`."""
    out = dtype if blend else "fp32"
    sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "NATIVE": "*fp32", "OUT": f"*{out}"}
    for t in ("q", "k", "v", "o"):
        sig.update({f"s{t}_b": "i32", f"s{t}_h": "i32", f"s{t}_n": "i32"})
    sig.update({"heads": "i32", "n_q": "i32", "n_k": "i32", "qk_scale_log2": "fp32", "lam": "fp32",
                "W": "i32", "w": "i32", "s_h": "i32", "s_w": "i32"})
    dot_dtype = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[dtype]
    return sig, {"BLEND": blend, "IEEE_DOT": dtype == "fp32", "DOT_DTYPE": dot_dtype}
