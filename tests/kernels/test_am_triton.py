"""am_attention's Triton kernel: run through TRITON_INTERPRET=1 against the float64
oracle (one child process per file, tests/triton_harness.py; each case is its own
test here), the output layout register_fake promises, and the kernel compiled
ahead of time for sm_80 / sm_90 without spills (in this process)."""

import functools

import pytest
import torch
from triton_harness import check_case

# (id, B, heads, lr_size, hr_size, d, dtype, lam, layout)
ORACLE_CASES = [
    ("2x_d64_fp32", 1, 2, (4, 4), (8, 8), 64, "float32", 0.7, "contiguous"),
    ("3x_d40_fp32", 1, 1, (6, 6), (18, 18), 40, "float32", 0.7, "contiguous"),
    ("2x4_d64_fp16", 1, 2, (4, 8), (8, 32), 64, "float16", 0.7, "contiguous"),
    ("odd_d59_bf16", 2, 1, (5, 7), (10, 14), 59, "bfloat16", 0.7, "contiguous"),
    ("d128_fp16", 1, 1, (3, 3), (6, 9), 128, "float16", 0.4, "contiguous"),
    ("lam0", 1, 2, (4, 4), (8, 8), 40, "float32", 0.0, "contiguous"),
    ("lam1", 1, 2, (4, 4), (8, 8), 40, "float32", 1.0, "contiguous"),
    ("transposed", 2, 3, (3, 5), (6, 10), 40, "float32", 0.7, "transposed"),
    # token stride 1 (q = randn(..., d, N).transpose(-1, -2)): the output must keep that layout
    ("token_stride_1", 1, 1, (2, 2), (4, 4), 16, "float32", 0.7, "feature_major"),
    ("sliced", 1, 2, (2, 4), (4, 8), 16, "float32", 0.7, "sliced"),
]


def _run_case(B, heads, lr, hr, d, dtype, lam, layout):
    from test_am_attention import make_layout
    from tolerance import assert_matches_oracle

    import fam_kernels
    from fam_kernels.reference import am_attention_materialized

    dtype = getattr(torch, dtype)
    N, n = hr[0] * hr[1], lr[0] * lr[1]
    q, k, v = (make_layout((B, heads, N, d), layout).to(dtype) for _ in range(3))
    q_lr, k_lr = (make_layout((B, heads, n, d), layout).to(dtype) for _ in range(2))
    kw = dict(lam=lam, hr_size=hr, lr_size=lr)
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, backend="triton", **kw)
    assert out.dtype == dtype and out.shape == q.shape
    promised = torch.empty_like(q).stride()
    assert out.stride() == promised, f"strides {out.stride()} != promised {promised}"
    oracle = am_attention_materialized(q, k, v, q_lr, k_lr, precision=torch.float64, **kw)
    same_dtype = am_attention_materialized(q, k, v, q_lr, k_lr, precision=dtype, **kw)
    assert_matches_oracle(out, oracle, same_dtype)


def _nan_inf_case():
    from test_am_attention import check_special_values

    check_special_values("triton")


INTERPRETED_CASES = {c[0]: functools.partial(_run_case, *c[1:]) for c in ORACLE_CASES}
INTERPRETED_CASES["nan_inf_as_oracle"] = _nan_inf_case


@pytest.mark.triton
@pytest.mark.parametrize("case_id", list(INTERPRETED_CASES))
def test_interpreted_kernel(case_id):
    check_case(__file__, case_id)


@pytest.mark.triton
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_aot_compiles_without_spills(head_dim, dtype, arch):
    from fam_kernels.triton import aot
    from fam_kernels.triton.am_attention import _am_attention_fwd, aot_signature, block_d, default_config

    cfg = default_config(head_dim, {"fp16": torch.float16, "fp32": torch.float32}[dtype])
    for blend in (False, True):  # the native pass and the high-res pass
        signature, flags = aot_signature(dtype, blend)
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_D=block_d(head_dim), **flags)
        report = aot.compile_kernel(_am_attention_fwd, signature, constexprs, arch, cfg["num_warps"],
                                    cfg["num_stages"])
        assert report.registers > 0
        assert report.spills == 0, f"{report.spill_stores} B spill stores, {report.spill_loads} B spill loads"
        assert report.shared_bytes <= (163 if arch == 80 else 227) * 1024



def test_fp32_dots_are_ieee_not_tf32():
    """Decision: fp32 inputs run true-fp32 tl.dot (input_precision="ieee"), never TF32,
    so fp32 results on a GPU stay within the fp32 tolerances the oracle tests use
    (TF32's 10-bit mantissa would not). Both kernels, every fp32 launch."""
    import inspect

    from fam_kernels.triton import am_attention as am_k
    from fam_kernels.triton import lowpass_blend as lp_k

    for blend in (False, True):
        assert am_k.aot_signature("fp32", blend)[1]["IEEE_DOT"] is True
    assert "IEEE_DOT=q.dtype == torch.float32" in inspect.getsource(am_k._attention_pass)
    assert 'tl.dot(a, b, acc, input_precision="ieee")' in inspect.getsource(lp_k.lowpass_gemm_kernel.fn)
