"""Triton lowpass_blend: out = z + gain * B_h B_h^T (z_ref - z) B_w B_w^T per plane.

One strided, batched GEMM kernel runs the four stages; the difference (and the
dtype conversion) is fused into the loads of the first, the scale, add of z and
cast into the store of the last, so z and z_ref are read once each and the output
written once; only the small (H x rank) coefficients go through memory between.

    coeffs    (P, H, r_w)  = (z_ref - z) @ B_w          DIFF
    band      (P, r_h, r_w) = B_h^T @ coeffs
    lp_coeffs (P, H, r_w)  = B_h @ band
    out       (P, H, W)    = z + gain * lp_coeffs @ B_w^T   BLEND

Every operand is addressed as (batch, row, col) with the batch index p of a
(B, C) plane split into p // C and p % C, so 4-D inputs of any strides are read in
place. Imported lazily (never at ``import fam_kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import triton
import triton.language as tl

# Default tile: tl.dot needs >= 16 per side; 64 x 64 x 32 at 4 warps compiles for
# sm_80 / sm_90 without spills (tests/kernels/test_triton_aot_lowpass.py).
DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
DEFAULT_NUM_WARPS = 4


@triton.jit
def _plane_offset(p, channels, stride_b, stride_c):
    return (p // channels) * stride_b + (p % channels) * stride_c


@triton.jit
def lowpass_gemm_kernel(
    a_ptr, a_sub_ptr, b_ptr, c_ptr, c_add_ptr,
    M, N, K, channels, gain,
    s_ab, s_ac, s_am, s_ak,
    s_xb, s_xc, s_xm, s_xk,
    s_bb, s_bc, s_bk, s_bn,
    s_cb, s_cc, s_cm, s_cn,
    s_yb, s_yc, s_ym, s_yn,
    DIFF: tl.constexpr, BLEND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c = (a - a_sub if DIFF else a) @ b, then c = c_add + gain * c if BLEND; fp32 accumulation."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    p = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + _plane_offset(p, channels, s_ab, s_ac)
    x_base = a_sub_ptr + _plane_offset(p, channels, s_xb, s_xc)
    b_base = b_ptr + _plane_offset(p, channels, s_bb, s_bc)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a_mask = (rm[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_base + rm[:, None] * s_am + kk[None, :] * s_ak, mask=a_mask, other=0.0).to(tl.float32)
        if DIFF:
            a -= tl.load(x_base + rm[:, None] * s_xm + kk[None, :] * s_xk, mask=a_mask, other=0.0).to(tl.float32)
        b_mask = (kk[:, None] < K) & (rn[None, :] < N)
        b = tl.load(b_base + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=b_mask, other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if BLEND:
        y_base = c_add_ptr + _plane_offset(p, channels, s_yb, s_yc)
        z = tl.load(y_base + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=c_mask, other=0.0).to(tl.float32)
        acc = z + gain * acc
    c_base = c_ptr + _plane_offset(p, channels, s_cb, s_cc)
    tl.store(c_base + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@dataclass(frozen=True)
class Operand:
    """A tensor seen as (plane, row, col): batch strides (b, c) and the two matrix strides."""

    tensor: torch.Tensor
    strides: Tuple[int, int, int, int]

    @staticmethod
    def planes(t: torch.Tensor, channels: int) -> "Operand":
        """(B, C, R, S) 4-D tensor, or (B*C, R, S) contiguous intermediate."""
        if t.dim() == 4:
            return Operand(t, tuple(t.stride()))
        s0, s1, s2 = t.stride()
        return Operand(t, (s0 * channels, s0, s1, s2))

    @staticmethod
    def shared(m: torch.Tensor, transpose: bool = False) -> "Operand":
        """One matrix used by every plane (batch strides 0)."""
        r, c = m.stride()
        return Operand(m, (0, 0, c, r) if transpose else (0, 0, r, c))


def _gemm(a: Operand, b: Operand, c: Operand, M: int, N: int, K: int, planes: int, channels: int, *,
          a_sub: Operand | None = None, c_add: Operand | None = None, gain: float = 1.0) -> None:
    cfg = DEFAULT_CONFIG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), planes)
    sub = a_sub or a
    add = c_add or c
    lowpass_gemm_kernel[grid](
        a.tensor, sub.tensor, b.tensor, c.tensor, add.tensor,
        M, N, K, channels, gain,
        *a.strides, *sub.strides, *b.strides, *c.strides, *add.strides,
        DIFF=a_sub is not None, BLEND=c_add is not None, num_warps=DEFAULT_NUM_WARPS, **cfg,
    )


def lowpass_blend_triton(z: torch.Tensor, z_ref: torch.Tensor, basis_h: torch.Tensor, basis_w: torch.Tensor,
                         gain: float) -> torch.Tensor:
    """``basis_*``: the (n, rank) float32 band bases of fam_kernels._lowpass_basis."""
    B, C, H, W = z.shape
    P = B * C
    rank_h, rank_w = basis_h.shape[1], basis_w.shape[1]
    f32 = dict(device=z.device, dtype=torch.float32)
    coeffs = torch.empty(P, H, rank_w, **f32)
    band = torch.empty(P, rank_h, rank_w, **f32)
    lp_coeffs = torch.empty(P, H, rank_w, **f32)
    out = torch.empty(B, C, H, W, device=z.device, dtype=z.dtype)

    def planes(t):
        return Operand.planes(t, C)

    _gemm(planes(z_ref), Operand.shared(basis_w), planes(coeffs), H, rank_w, W, P, C, a_sub=planes(z))
    _gemm(Operand.shared(basis_h, transpose=True), planes(coeffs), planes(band), rank_h, rank_w, H, P, C)
    _gemm(Operand.shared(basis_h), planes(band), planes(lp_coeffs), H, rank_w, rank_h, P, C)
    _gemm(planes(lp_coeffs), Operand.shared(basis_w, transpose=True), planes(out), H, W, rank_w, P, C,
          c_add=planes(z), gain=gain)
    return out


# The kernel variants the host code launches: (DIFF, BLEND, element type of the
# inputs it reads / the output it writes). The middle stages are float32 only.
LAUNCHED_VARIANTS = [(True, False, "fp32"), (False, False, "fp32"), (False, True, "fp32"),
                     (True, False, "fp16"), (True, False, "bf16"), (False, True, "fp16"), (False, True, "bf16")]


def aot_signature(diff: bool, blend: bool, io: str):
    """Triton signature and constexprs of one launched variant, for fam_kernels.triton.aot.compile_kernel."""
    strides = [f"s_{t}{d}" for t, dims in (("a", "bcmk"), ("x", "bcmk"), ("b", "bckn"), ("c", "bcmn"), ("y", "bcmn"))
               for d in dims]
    sig = {"a_ptr": "*fp32", "a_sub_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "c_add_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "channels": "i32", "gain": "fp32", **{s: "i32" for s in strides}}
    if diff:
        sig["a_ptr"] = sig["a_sub_ptr"] = f"*{io}"
    if blend:
        sig["c_ptr"] = sig["c_add_ptr"] = f"*{io}"
    return sig, {"DIFF": diff, "BLEND": blend, **DEFAULT_CONFIG}
