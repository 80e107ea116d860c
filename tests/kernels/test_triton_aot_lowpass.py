"""The Triton lowpass_blend kernel compiled ahead of time for sm_80 and sm_90 at its
default configuration, in every variant the host code launches: no register spills."""

import pytest

from fam_kernels.triton.aot import compile_kernel
from fam_kernels.triton.lowpass_blend import LAUNCHED_VARIANTS  # imports triton; needs no driver


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variant", LAUNCHED_VARIANTS, ids=lambda v: f"diff{int(v[0])}-blend{int(v[1])}-{v[2]}")
def test_default_config_compiles_without_spills(arch, variant):
    from fam_kernels.triton import lowpass_blend as k

    signature, constexprs = k.aot_signature(*variant)
    report = compile_kernel(k.lowpass_gemm_kernel, signature, constexprs, arch, num_warps=k.DEFAULT_NUM_WARPS)
    assert report.registers > 0, report.ptxas_log
    assert report.spills == 0, report.ptxas_log
