"""The Triton lowpass_blend kernel run by Triton's CPU interpreter (one child process
per file, tests/triton_harness.py; each case is its own test here). The
ahead-of-time compile test (tests/kernels/test_triton_aot_lowpass.py) needs the same module
compiled normally. A failure or a missing Triton fails the case; nothing is skipped."""

import functools

import pytest
import torch
from triton_harness import check_case


def _check(z, zr, cutoff, gain, torch_same_dtype=None):
    from tolerance import assert_matches_oracle

    import fam_kernels
    from fam_kernels.reference import lowpass_blend_reference

    out = fam_kernels.lowpass_blend(z, zr, cutoff, gain, backend="triton")
    assert out.dtype == z.dtype and out.shape == z.shape
    assert out.is_contiguous(), f"strides {out.stride()}: register_fake promises a contiguous output"
    c = cutoff if isinstance(cutoff, tuple) else (cutoff, cutoff)
    want = lowpass_blend_reference(z.double(), zr.double(), c, gain, precision=torch.float64)
    if torch_same_dtype is None:
        assert_matches_oracle(out, want, floor=1e-5)
    else:
        assert_matches_oracle(out, want, torch_same_dtype(z, zr, c, gain))


def _random(shape, cutoff, gain):
    _check(torch.randn(shape), torch.randn(shape), cutoff, gain)


def _strided():
    z = torch.randn(1, 2, 9, 7).transpose(-1, -2)
    zr = torch.randn(1, 4, 7, 18)[:, ::2, :, ::2]
    _check(z, zr, (5, 4), 0.5)


def _channels_last():
    z = torch.randn(1, 3, 8, 6).to(memory_format=torch.channels_last)
    zr = torch.randn(1, 3, 8, 6).to(memory_format=torch.channels_last)
    _check(z, zr, (5, 4), 0.5)


def _low_precision(dtype):
    from fam_kernels.reference import lowpass_blend_reference

    z, zr = torch.randn(1, 2, 12, 10).to(dtype), torch.randn(1, 2, 12, 10).to(dtype)
    _check(z, zr, (6, 5), 0.8, lambda z, zr, c, g: lowpass_blend_reference(z, zr, c, g, precision=torch.float32))


def _empty_band_is_copy():
    import fam_kernels

    z, zr = torch.randn(1, 1, 6, 6), torch.randn(1, 1, 6, 6)
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, 0, 0.5, backend="triton"), z)


def _nan_poisons_plane():
    import fam_kernels

    z, zr = torch.randn(1, 1, 6, 6), torch.randn(1, 1, 6, 6)
    zr[0, 0, 2, 3] = float("nan")
    assert torch.isnan(fam_kernels.lowpass_blend(z, zr, 3, 0.5, backend="triton")).all()


INTERPRETED_CASES = {
    "1x1": functools.partial(_random, (1, 1, 1, 1), (3, 3), 1.0),
    "odd_sizes_band_edge": functools.partial(_random, (2, 3, 7, 9), (3, 4), 0.3),
    "full_band_w": functools.partial(_random, (1, 2, 20, 33), (9, 40), 0.7),
    "rows_over_one_tile": functools.partial(_random, (1, 1, 70, 18), (70.5, 2.5), 1.0),
    "inf_cutoff": functools.partial(_random, (1, 1, 6, 5), float("inf"), 0.6),
    "strided": _strided,
    "channels_last": _channels_last,
    "fp16": functools.partial(_low_precision, torch.float16),
    "bf16": functools.partial(_low_precision, torch.bfloat16),
    "empty_band_is_copy": _empty_band_is_copy,
    "nan_poisons_plane": _nan_poisons_plane,
}


@pytest.mark.triton
@pytest.mark.parametrize("case_id", list(INTERPRETED_CASES))
def test_interpreted_kernel(case_id):
    check_case(__file__, case_id)
