"""The Triton lowpass_blend kernel run by Triton's CPU interpreter.

TRITON_INTERPRET must be set before the kernel module is first imported, and the
ahead-of-time test (tests/test_triton_aot_lowpass.py) needs the same module
compiled normally, so the cases run in a child process: this file executed as a
script. A failure or a missing Triton there fails the test; nothing is skipped.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_interpreter_matches_oracle():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cases passed: 9" in proc.stdout, proc.stdout[-3000:]


def _run_cases():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from tolerance import assert_matches_oracle

    import fam_kernels
    from fam_kernels.reference import lowpass_blend_reference

    torch.manual_seed(0)

    def check(z, zr, cutoff, gain, torch_same_dtype=None):
        out = fam_kernels.lowpass_blend(z, zr, cutoff, gain, backend="triton")
        assert out.dtype == z.dtype and out.shape == z.shape
        want = lowpass_blend_reference(z.double(), zr.double(), cutoff, gain, precision=torch.float64)
        if torch_same_dtype is None:
            assert_matches_oracle(out, want, floor=1e-5)
        else:
            assert_matches_oracle(out, want, torch_same_dtype(z, zr, cutoff, gain))

    cases = 0
    for shape, cutoff, gain in [
        ((1, 1, 1, 1), (3, 3), 1.0),
        ((2, 3, 7, 9), (3, 4), 0.3),  # odd sizes, band edge 2k
        ((1, 2, 20, 33), (9, 40), 0.7),  # full band along W
        ((1, 1, 70, 18), (70.5, 2.5), 1.0),  # more rows than one 64-row tile
    ]:
        check(torch.randn(shape), torch.randn(shape), cutoff, gain)
        cases += 1
    z = torch.randn(1, 2, 9, 7).transpose(-1, -2)
    zr = torch.randn(1, 4, 7, 18)[:, ::2, :, ::2]
    check(z, zr, (5, 4), 0.5)  # non-contiguous
    cases += 1
    for dtype in (torch.float16, torch.bfloat16):
        z, zr = torch.randn(1, 2, 12, 10).to(dtype), torch.randn(1, 2, 12, 10).to(dtype)
        check(z, zr, (6, 5), 0.8,
              lambda z, zr, c, g: lowpass_blend_reference(z, zr, c, g, precision=torch.float32))
        cases += 1
    z, zr = torch.randn(1, 1, 6, 6), torch.randn(1, 1, 6, 6)
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, 0, 0.5, backend="triton"), z)
    cases += 1
    zr[0, 0, 2, 3] = float("nan")
    assert torch.isnan(fam_kernels.lowpass_blend(z, zr, 3, 0.5, backend="triton")).all()
    cases += 1
    print(f"cases passed: {cases}")


if __name__ == "__main__":
    _run_cases()
