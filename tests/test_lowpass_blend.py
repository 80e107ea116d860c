"""lowpass_blend: every CPU backend (and both forms of torch and cpu) against the
float64 eq. 4 oracle, properties, dtypes, strides, validation, dispatch, the
torch.library registration. Triton: tests/test_lowpass_triton.py (interpreter)
and tests/test_triton_aot_lowpass.py (sm_80 / sm_90 compile)."""

import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerance import assert_matches_oracle

import fam_kernels
from fam_kernels import _lowpass_basis as basis
from fam_kernels import lowpass as lp
from fam_kernels.dispatch import BackendNotSupportedError
from fam_kernels.reference import fm_modulate, lowpass_blend_reference

# The extension must be there unless the install skipped it on purpose.
EXTENSION_EXPECTED = not os.environ.get("FAM_KERNELS_SKIP_BUILD")
BACKENDS = ["torch", "cpu"] if EXTENSION_EXPECTED else ["torch"]


def _cpu_lowrank(z, zr, kh, kw, g):
    return torch.ops.fam_C.lowpass_blend_lowrank(z, zr, *lp._folded_bases(z, kh, kw), g)


def _cpu_spectral(z, zr, kh, kw, g):
    return torch.ops.fam_C.lowpass_blend_spectral(z, zr, basis.fft_band_mask(z.shape[-2], kh, z.device), kw, g)


# Each form of each backend, called on the band counts directly (the op picks one per size).
FORMS = {"torch_lowrank": lp._torch_lowrank, "torch_spectral": lp._torch_spectral}
if EXTENSION_EXPECTED:
    FORMS.update(cpu_lowrank=_cpu_lowrank, cpu_spectral=_cpu_spectral)


def oracle(z, zr, cutoff, gain):
    c = cutoff if isinstance(cutoff, tuple) else (cutoff, cutoff)
    return lowpass_blend_reference(z.double(), zr.double(), c, gain, precision=torch.float64)


def pair_of(shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


SHAPES = [(1, 1, 1, 1), (2, 3, 7, 9), (1, 2, 97, 130), (2, 2, 128, 128), (1, 2, 256, 192), (1, 3, 512, 512)]


def edge_cutoffs(H, W):
    """0, band edges exactly (2k), between edges, the full band and beyond."""
    return [0, 1, 2, 2.5, (4, 6), (H / 4, W / 4), (H // 2, W // 2), (H - 1, W - 1), (H, W), (H + 1, W + 1),
            3 * max(H, W)]


def test_extension_loaded_when_expected():
    if EXTENSION_EXPECTED:
        assert fam_kernels.extension_unavailable_reason() is None
    else:
        assert fam_kernels.extension_unavailable_reason() is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_oracle(backend, shape):
    z, zr = pair_of(shape)
    H, W = shape[-2:]
    cutoffs = edge_cutoffs(H, W) if H * W <= 128 * 128 else [(H / 4, W / 4), (H // 2 - 1, W // 2), 2 * max(H, W)]
    for cutoff in cutoffs:
        for gain in (0.0, 0.3, 1.0):
            out = fam_kernels.lowpass_blend(z, zr, cutoff, gain, backend=backend)
            assert out.dtype == z.dtype and out.is_contiguous()
            assert_matches_oracle(out, oracle(z, zr, cutoff, gain), floor=2e-6 * math.log2(2 * H * W))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 2, 2), (2, 3, 7, 9), (1, 2, 33, 20), (1, 1, 64, 96)],
                         ids=lambda s: "x".join(map(str, s)))
def test_each_form_matches_oracle(form, shape):
    z, zr = pair_of(shape)
    H, W = shape[-2:]
    for cutoff in edge_cutoffs(H, W)[1:]:
        ch, cw = cutoff if isinstance(cutoff, tuple) else (cutoff, cutoff)
        kh, kw = basis.kept_bins(H, ch), basis.kept_bins(W, cw)
        if kh == 0 or kw == 0:
            continue  # an empty band never reaches a backend (the op returns a copy of z)
        out = FORMS[form](z, zr, kh, kw, 0.7)
        assert_matches_oracle(out, oracle(z, zr, (ch, cw), 0.7), floor=1e-5)


def test_band_counts_follow_the_centred_rule():
    for n in range(1, 12):
        for cutoff in [0, 0.5, 1, 2, 3, 4, n - 1, n, n + 0.5, 2 * n]:
            centred = [k - n // 2 for k in range(n)]
            kept = [k for k in centred if 2 * abs(k) < cutoff]
            assert basis.band_rank(n, basis.kept_bins(n, cutoff)) == len(kept)


def test_basis_is_orthonormal_and_folds():
    for n in (1, 2, 3, 8, 9, 16):
        for kept in range(1, n // 2 + 2):
            b = basis.band_basis(n, kept, torch.device("cpu"))
            eye = torch.eye(b.rank)
            assert torch.allclose(b.full.T @ b.full, eye, atol=1e-6)
            n_cos = b.cos_folded.shape[1]
            assert torch.allclose(b.full[: n // 2 + 1, :n_cos], b.cos_folded)
            assert torch.allclose(b.full[1 : (n - 1) // 2 + 1, n_cos:], b.sin_folded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend):
    z, zr = pair_of((2, 3, 24, 30))
    for cutoff in (0, 7, (24, 30)):
        same = fam_kernels.lowpass_blend(z, zr, cutoff, 0.0, backend=backend)
        assert torch.equal(same, z) and same.data_ptr() != z.data_ptr()
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, 0, 1.0, backend=backend), z)
    full = fam_kernels.lowpass_blend(z, zr, (25, 31), 1.0, backend=backend)
    assert torch.allclose(full, zr, atol=2e-6)
    # Linear in z_ref - z: shifting both by the same tensor shifts the result.
    shift = torch.randn_like(z)
    a = fam_kernels.lowpass_blend(z, zr, 9, 0.6, backend=backend)
    b = fam_kernels.lowpass_blend(z + shift, zr + shift, 9, 0.6, backend=backend)
    assert torch.allclose(b - shift, a, atol=1e-5)
    two = fam_kernels.lowpass_blend(z, z + 2 * (zr - z), 9, 0.3, backend=backend)
    assert torch.allclose(two - z, 2 * (a - z) * 0.3 / 0.6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [0, 1, 300, 500, 999, 1000])
def test_schedule_matches_fm_modulate(backend, t):
    z, zt = pair_of((1, 4, 64, 48))
    cutoff, gain = fam_kernels.fm_schedule(t, 1000, 64, 48)
    out = fam_kernels.lowpass_blend(z, zt, cutoff, gain, backend=backend)
    want = fm_modulate(z.double(), zt.double(), t, 1000, precision=torch.float64)
    assert_matches_oracle(out, want, floor=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    z = torch.randn(2, 3, 40, 36).transpose(-1, -2)  # (2, 3, 36, 40), W stride != 1
    zr = torch.randn(2, 6, 36, 80)[:, ::2, :, ::2]  # sliced: every stride differs from z's
    assert not z.is_contiguous() and not zr.is_contiguous()
    for cutoff in (5, (9, 12), 30):
        out = fam_kernels.lowpass_blend(z, zr, cutoff, 0.5, backend=backend)
        assert_matches_oracle(out, oracle(z, zr, cutoff, 0.5), floor=1e-5)
        expected = fam_kernels.lowpass_blend(z.contiguous(), zr.contiguous(), cutoff, 0.5, backend=backend)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cutoff", [(6, 9), (40, 36), 200])
def test_low_precision_within_torch_error(backend, dtype, cutoff):
    z, zr = pair_of((2, 2, 48, 40), dtype)
    out = fam_kernels.lowpass_blend(z, zr, cutoff, 0.7, backend=backend)
    assert out.dtype == dtype
    want = oracle(z, zr, cutoff, 0.7)
    c = cutoff if isinstance(cutoff, tuple) else (cutoff, cutoff)
    torch_same_dtype = lowpass_blend_reference(z, zr, c, 0.7, precision=torch.float32)  # fft at fp32, cast back
    assert_matches_oracle(out, want, torch_same_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_poisons_its_plane_only(backend):
    z, zr = pair_of((2, 3, 20, 18))
    zr[1, 2, 5, 7] = float("nan")
    for cutoff in (3, (20, 18), 50):
        out = fam_kernels.lowpass_blend(z, zr, cutoff, 0.4, backend=backend)
        assert torch.isnan(out[1, 2]).all()
        rest = torch.ones(2, 3, dtype=torch.bool)
        rest[1, 2] = False
        assert torch.isfinite(out[rest]).all()
        assert_matches_oracle(out, oracle(z, zr, cutoff, 0.4), floor=1e-5)
    # No band or no gain: the reference contributes nothing, NaN included.
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, 0, 0.4, backend=backend), z)
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, 5, 0.0, backend=backend), z)


@given(
    h=st.integers(1, 40), w=st.integers(1, 40), planes=st.integers(1, 3),
    ch=st.floats(0, 90, allow_nan=False), cw=st.floats(0, 90, allow_nan=False), gain=st.floats(0, 1),
    backend=st.sampled_from(BACKENDS),
)
def test_fuzz_against_oracle(h, w, planes, ch, cw, gain, backend):
    z, zr = pair_of((1, planes, h, w))
    out = fam_kernels.lowpass_blend(z, zr, (ch, cw), gain, backend=backend)
    assert_matches_oracle(out, oracle(z, zr, (ch, cw), gain), floor=1e-5)


def test_default_backend_on_cpu():
    z, zr = pair_of((1, 1, 8, 8))
    chosen = lp.DISPATCHER.select(None, "cpu", z=z, z_ref=zr)
    assert chosen.name == ("cpu" if EXTENSION_EXPECTED else "torch")


def test_dispatch_errors_and_env(monkeypatch):
    z, zr = pair_of((1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"one of \['auto', 'cuda', 'triton', 'cpu', 'torch'\]"):
        fam_kernels.lowpass_blend(z, zr, 4, 0.5, backend="nope")
    with pytest.raises(BackendNotSupportedError, match="cuda.*needs CUDA tensors"):
        fam_kernels.lowpass_blend(z, zr, 4, 0.5, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET"):
        fam_kernels.lowpass_blend(z, zr, 4, 0.5, backend="triton")
    # Explicit choice is refused even when the result would be a plain copy.
    with pytest.raises(BackendNotSupportedError):
        fam_kernels.lowpass_blend(z, zr, 0, 0.0, backend="cuda")
    monkeypatch.setenv(lp.ENV_VAR, "cuda")
    with pytest.raises(BackendNotSupportedError):
        fam_kernels.lowpass_blend(z, zr, 4, 0.5)
    monkeypatch.setenv(lp.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        fam_kernels.lowpass_blend(z, zr, 4, 0.5)
    monkeypatch.setenv(lp.ENV_VAR, "torch")
    monkeypatch.setenv("FAM_KERNELS_BACKEND", "cuda")  # the op's own variable wins
    assert torch.allclose(fam_kernels.lowpass_blend(z, zr, 4, 0.5), lp._torch_spectral(z, zr, 2, 2, 0.5), atol=1e-6)


def test_missing_extension_falls_back_to_torch(monkeypatch):
    from fam_kernels import _backend_reasons

    monkeypatch.setattr(_backend_reasons, "extension_unavailable_reason", lambda: "compiled extension not built (test)")
    z, zr = pair_of((1, 2, 16, 12))
    assert lp.DISPATCHER.select(None, "cpu", z=z, z_ref=zr).name == "torch"
    out = fam_kernels.lowpass_blend(z, zr, 5, 0.5)
    assert_matches_oracle(out, oracle(z, zr, 5, 0.5), floor=1e-5)
    with pytest.raises(BackendNotSupportedError, match="not built"):
        fam_kernels.lowpass_blend(z, zr, 5, 0.5, backend="cpu")


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(3, 8, 8), torch.randn(3, 8, 8), 4, 0.5), ValueError, "z must be 4-D"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 9), 4, 0.5), ValueError, "z_ref must have z's shape"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8).half(), 4, 0.5), TypeError, "z_ref has dtype"),
        ((torch.randn(1, 1, 8, 8).double(), torch.randn(1, 1, 8, 8).double(), 4, 0.5), TypeError, "float32, float16"),
        ((torch.ones(1, 1, 8, 8, dtype=torch.int64),) * 2 + (4, 0.5), TypeError, "z must be float32"),
        ((torch.randn(1, 0, 8, 8), torch.randn(1, 0, 8, 8), 4, 0.5), ValueError, "must not be empty"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), -1, 0.5), ValueError, "cutoff must be >= 0"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), float("nan"), 0.5), ValueError, "cutoff"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), (1, 2, 3), 0.5), TypeError, "cutoff must be"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), "4", 0.5), TypeError, "cutoff must be"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), 4, 1.5), ValueError, r"gain must be in \[0.0, 1.0\]"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), 4, -0.1), ValueError, "gain"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), 4, float("nan")), ValueError, "gain"),
        ((torch.randn(1, 1, 8, 8), [[1.0]], 4, 0.5), TypeError, "z_ref must be a torch.Tensor"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fam_kernels.lowpass_blend(*args)


def test_mixed_devices_rejected():
    z = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="z_ref is on meta"):
        fam_kernels.lowpass_blend(z, torch.empty(1, 1, 8, 8, device="meta"), 4, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z, zr = pair_of((2, 2, 12, 10))
    for cutoff_h, cutoff_w, gain in [(5.0, 3.0, 0.5), (0.0, 4.0, 0.5), (30.0, 30.0, 1.0)]:
        torch.library.opcheck(torch.ops.fam_kernels.lowpass_blend.default,
                              (z.requires_grad_(), zr.requires_grad_(), cutoff_h, cutoff_w, gain, backend))


def test_torch_compile_fullgraph():
    def step(z, zr):
        return fam_kernels.lowpass_blend(z * 2, zr, (5, 7), 0.5) + 1

    z, zr = pair_of((1, 2, 16, 20))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(z, zr), step(z, zr), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_transposed_lowpass(backend):
    z, zr = pair_of((1, 2, 14, 11))
    z.requires_grad_()
    zr.requires_grad_()
    out = fam_kernels.lowpass_blend(z, zr, (6, 5), 0.8, backend=backend)
    g = torch.randn_like(out)
    gz, gzr = torch.autograd.grad(out, (z, zr), g)
    want_zr = lowpass_blend_reference(torch.zeros_like(g).double(), g.double(), (6, 5), 0.8, precision=torch.float64)
    assert torch.allclose(gzr.double(), want_zr, atol=1e-5)
    assert torch.allclose(gz.double(), g.double() - want_zr, atol=1e-5)
