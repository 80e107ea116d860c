"""am_attention's Triton kernel: run through TRITON_INTERPRET=1 against the float64
oracle, and compiled ahead of time for sm_80 / sm_90 without spills.

Triton picks the interpreter when a kernel is decorated, so the interpreted cases
run in one child process started with TRITON_INTERPRET=1 (this file, executed as
a script); each case is then its own test here. The AOT checks need the
uninterpreted kernel and run in this process."""

import json
import os
import subprocess
import sys

import pytest
import torch

# (id, B, heads, lr_size, hr_size, d, dtype, lam, layout)
INTERPRETED_CASES = [
    ("2x_d64_fp32", 1, 2, (4, 4), (8, 8), 64, "float32", 0.7, "contiguous"),
    ("3x_d40_fp32", 1, 1, (6, 6), (18, 18), 40, "float32", 0.7, "contiguous"),
    ("2x4_d64_fp16", 1, 2, (4, 8), (8, 32), 64, "float16", 0.7, "contiguous"),
    ("odd_d59_bf16", 2, 1, (5, 7), (10, 14), 59, "bfloat16", 0.7, "contiguous"),
    ("d128_fp16", 1, 1, (3, 3), (6, 9), 128, "float16", 0.4, "contiguous"),
    ("lam0", 1, 2, (4, 4), (8, 8), 40, "float32", 0.0, "contiguous"),
    ("lam1", 1, 2, (4, 4), (8, 8), 40, "float32", 1.0, "contiguous"),
    ("transposed", 2, 3, (3, 5), (6, 10), 40, "float32", 0.7, "transposed"),
]


def _run_case(B, heads, lr, hr, d, dtype, lam, layout):
    from tolerance import assert_matches_oracle

    import fam_kernels
    from fam_kernels.reference import am_attention_materialized

    dtype = getattr(torch, dtype)
    N, n = hr[0] * hr[1], lr[0] * lr[1]
    if layout == "transposed":  # diffusers' (B, N, heads, d) viewed as (B, heads, N, d)
        q, k, v = (torch.randn(B, N, heads, d).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, heads, N, d).to(dtype) for _ in range(3))
    q_lr, k_lr = (torch.randn(B, heads, n, d).to(dtype) for _ in range(2))
    kw = dict(lam=lam, hr_size=hr, lr_size=lr)
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, backend="triton", **kw)
    assert out.dtype == dtype and out.shape == q.shape
    oracle = am_attention_materialized(q, k, v, q_lr, k_lr, precision=torch.float64, **kw)
    same_dtype = am_attention_materialized(q, k, v, q_lr, k_lr, precision=dtype, **kw)
    assert_matches_oracle(out, oracle, same_dtype)


def _child_main():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for case_id, *args in INTERPRETED_CASES:
        torch.manual_seed(0)
        try:
            _run_case(*args)
            results[case_id] = None
        except Exception as exc:  # reported to the parent, one test per case
            results[case_id] = f"{type(exc).__name__}: {exc}"
    print("FAM_RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("FAM_RESULTS "):
            return json.loads(line[len("FAM_RESULTS "):])
    pytest.fail(f"interpreter child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


@pytest.mark.triton
@pytest.mark.parametrize("case_id", [c[0] for c in INTERPRETED_CASES])
def test_interpreted_kernel_matches_oracle(interpreted_results, case_id):
    assert case_id in interpreted_results
    assert interpreted_results[case_id] is None, interpreted_results[case_id]


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


if __name__ == "__main__":
    _child_main()
