"""lowpass_blend: every CPU backend (and both forms of torch and cpu) against the
float64 eq. 4 oracle, properties, dtypes, strides, validation, dispatch, the
torch.library registration. Triton: tests/kernels/test_lowpass_triton.py (interpreter)
and tests/kernels/test_triton_aot_lowpass.py (sm_80 / sm_90 compile)."""

import importlib
import math
import os

import pytest
import torch
from devices import backends_on, device_backends
from hypothesis import given
from hypothesis import strategies as st
from tolerance import assert_matches_oracle

import fam_kernels
from fam_kernels import _lowpass_basis as basis
from fam_kernels.dispatch import BackendNotSupportedError
from fam_kernels.reference import fm_modulate, lowpass_blend_reference

lp = importlib.import_module("fam_kernels.lowpass_blend")  # the module (fam_kernels.lowpass_blend is the op)

# The extension must be there unless the install skipped it on purpose.
EXTENSION_EXPECTED = not os.environ.get("FAM_KERNELS_SKIP_BUILD")
DEVICE_BACKENDS = device_backends(lp.DISPATCHER)
BACKENDS = backends_on(lp.DISPATCHER, "cpu")  # CPU-only checks


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


def pair_of(shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape).to(device, dtype), torch.randn(shape).to(device, dtype)


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


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_oracle(device, backend, shape):
    z, zr = pair_of(shape, device=device)
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


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_properties(device, backend):
    z, zr = pair_of((2, 3, 24, 30), device=device)
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


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("t", [0, 1, 300, 500, 999, 1000])
def test_schedule_matches_fm_modulate(device, backend, t):
    z, zt = pair_of((1, 4, 64, 48), device=device)
    cutoff, gain = fam_kernels.fm_schedule(t, 1000, 64, 48)
    out = fam_kernels.lowpass_blend(z, zt, cutoff, gain, backend=backend)
    want = fm_modulate(z.double(), zt.double(), t, 1000, precision=torch.float64)
    assert_matches_oracle(out, want, floor=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_non_contiguous_inputs(device, backend):
    z = torch.randn(2, 3, 40, 36, device=device).transpose(-1, -2)  # (2, 3, 36, 40), W stride != 1
    zr = torch.randn(2, 6, 36, 80, device=device)[:, ::2, :, ::2]  # sliced: every stride differs from z's
    assert not z.is_contiguous() and not zr.is_contiguous()
    for cutoff in (5, (9, 12), 30):
        out = fam_kernels.lowpass_blend(z, zr, cutoff, 0.5, backend=backend)
        assert_matches_oracle(out, oracle(z, zr, cutoff, 0.5), floor=1e-5)
        expected = fam_kernels.lowpass_blend(z.contiguous(), zr.contiguous(), cutoff, 0.5, backend=backend)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cutoff", [(6, 9), (40, 36), 200])
def test_low_precision_within_torch_error(device, backend, dtype, cutoff):
    z, zr = pair_of((2, 2, 48, 40), dtype, device)
    out = fam_kernels.lowpass_blend(z, zr, cutoff, 0.7, backend=backend)
    assert out.dtype == dtype
    want = oracle(z, zr, cutoff, 0.7)
    c = cutoff if isinstance(cutoff, tuple) else (cutoff, cutoff)
    torch_same_dtype = lowpass_blend_reference(z, zr, c, 0.7, precision=torch.float32)  # fft at fp32, cast back
    assert_matches_oracle(out, want, torch_same_dtype)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nan_poisons_its_plane_only(device, backend):
    z, zr = pair_of((2, 3, 20, 18), device=device)
    zr[1, 2, 5, 7] = float("nan")
    for cutoff in (3, (20, 18), 50):
        out = fam_kernels.lowpass_blend(z, zr, cutoff, 0.4, backend=backend)
        assert torch.isnan(out[1, 2]).all()
        rest = torch.ones(2, 3, dtype=torch.bool, device=device)
        rest[1, 2] = False
        assert torch.isfinite(out[rest]).all()
        assert_matches_oracle(out, oracle(z, zr, cutoff, 0.4), floor=1e-5)
    # No band or no gain: the reference contributes nothing, NaN included.
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, 0, 0.4, backend=backend), z)
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, 5, 0.0, backend=backend), z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cutoff", [5e-324, 1e-320, 2.2e-308])  # subnormal / tiny: k = 0 is still in the band
def test_tiny_positive_cutoff_keeps_the_mean(backend, cutoff):
    z, zr = pair_of((1, 1, 3, 4))
    out = fam_kernels.lowpass_blend(z, zr, cutoff, 1.0, backend=backend)
    assert_matches_oracle(out, oracle(z, zr, cutoff, 1.0), floor=1e-5)


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
    chosen = lp.DISPATCHER.select(None, "cpu", z.dtype)
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
    from fam_kernels import _ext

    monkeypatch.setattr(_ext, "extension_unavailable_reason", lambda: "compiled extension not built (test)")
    z, zr = pair_of((1, 2, 16, 12))
    assert lp.DISPATCHER.select(None, "cpu", z.dtype).name == "torch"
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
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), True, 0.5), TypeError, "cutoff must be"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), (4, True), 0.5), TypeError, "cutoff must be"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), -float("inf"), 0.5), ValueError, "cutoff must be >= 0"),
        # one rule for numbers everywhere: bools and numeric strings are refused like cutoff's
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), 4, "0.5"), TypeError, "gain must be a real number"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), 4, True), TypeError, "gain must be a real number"),
        ((torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8), 4, float("inf")), ValueError, "gain must be in"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fam_kernels.lowpass_blend(*args)


def test_backend_must_be_a_string():
    z, zr = pair_of((1, 1, 8, 8))
    with pytest.raises(TypeError, match=r"backend must be a string.*\['cpu'\]"):
        fam_kernels.lowpass_blend(z, zr, 4, 0.5, backend=["cpu"])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_infinite_cutoff_is_the_full_band(device, backend):
    """inf passes validation and means 2|k| < inf: every frequency, as in the reference."""
    z, zr = pair_of((2, 2, 9, 12), device=device)
    for cutoff in (float("inf"), (float("inf"), 5), (4, float("inf"))):
        out = fam_kernels.lowpass_blend(z, zr, cutoff, 0.6, backend=backend)
        assert_matches_oracle(out, oracle(z, zr, cutoff, 0.6), floor=1e-5)
    full = fam_kernels.lowpass_blend(z, zr, (9 + 2, 12 + 2), 0.6, backend=backend)
    assert torch.equal(fam_kernels.lowpass_blend(z, zr, float("inf"), 0.6, backend=backend), full)


def test_kept_bins_limit():
    for n in (1, 2, 7, 8):
        assert basis.kept_bins(n, float("inf")) == n // 2 + 1 == basis.kept_bins(n, n + 1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(c=float("inf")), ValueError, "c must be finite"),
    (dict(T=float("inf")), ValueError, "T .* must be finite"),
    (dict(t=float("inf")), ValueError, "t must be in"),
    (dict(c=True), TypeError, "c must be a real number"),
    (dict(t="3"), TypeError, "t must be a real number"),
    (dict(T="1000"), TypeError, "T .* must be a real number"),
    (dict(height=True), ValueError, "height must be an int"),
])
def test_schedule_rejects_non_finite_and_non_numbers(kwargs, error, match):
    args = dict(t=300, T=1000, height=64, width=48, c=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fam_kernels.fm_schedule(args["t"], args["T"], args["height"], args["width"], args["c"])


@pytest.mark.parametrize("shape,cutoff", [((2, 3, 20, 18), (7, 5)), ((1, 4, 33, 16), (40, 3)),
                                          ((1, 1, 8, 8), 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_meta_models_the_cuda_default(shape, cutoff, dtype):
    """Meta tensors: a contiguous output of z's shape and dtype, and the compiled CUDA
    pipeline's buffers, visible to a dispatch-mode tracer."""
    from test_am_attention import _traced_allocations

    z = torch.empty(shape, device="meta", dtype=dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    zr = torch.empty(shape, device="meta", dtype=dtype)
    lp.lowpass_blend(z, zr, cutoff, 0.5)  # warm the per-device basis cache (allocated once, as on CUDA)
    out, sizes = _traced_allocations(lambda: lp.lowpass_blend(z, zr, cutoff, 0.5))
    assert out.device.type == "meta" and out.dtype == dtype and out.shape == shape and out.is_contiguous()
    P, (H, W), e = shape[0] * shape[1], shape[-2:], torch.empty((), dtype=dtype).element_size()
    c = cutoff if isinstance(cutoff, tuple) else (cutoff, cutoff)
    kh, kw = basis.kept_bins(H, c[0]), basis.kept_bins(W, c[1])
    if kh == 0 or kw == 0:
        assert sizes == [P * H * W * e]  # the copy of z
        return
    rank_h, rank_w = basis.band_rank(H, kh), basis.band_rank(W, kw)
    expected = [P * H * W * e, P * H * W * 4, P * H * rank_w * 4, P * H * rank_w * 4,
                P * kh * rank_w * 4, P * (rank_h - kh) * rank_w * 4, P * H * rank_w * 4, P * H * rank_w * 4]
    assert sizes == expected


def test_mixed_devices_rejected():
    z = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="z_ref is on meta"):
        fam_kernels.lowpass_blend(z, torch.empty(1, 1, 8, 8, device="meta"), 4, 0.5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_opcheck(device, backend):
    z, zr = pair_of((2, 2, 12, 10), device=device)
    for cutoff_h, cutoff_w, gain in [(5.0, 3.0, 0.5), (0.0, 4.0, 0.5), (30.0, 30.0, 1.0)]:
        torch.library.opcheck(torch.ops.fam_kernels.lowpass_blend.default,
                              (z.requires_grad_(), zr.requires_grad_(), cutoff_h, cutoff_w, gain, backend))


def test_torch_compile_fullgraph():
    def step(z, zr):
        return fam_kernels.lowpass_blend(z * 2, zr, (5, 7), 0.5) + 1

    z, zr = pair_of((1, 2, 16, 20))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(z, zr), step(z, zr), atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gradients_are_the_transposed_lowpass(device, backend):
    z, zr = pair_of((1, 2, 14, 11), device=device)
    z.requires_grad_()
    zr.requires_grad_()
    out = fam_kernels.lowpass_blend(z, zr, (6, 5), 0.8, backend=backend)
    g = torch.randn_like(out)
    gz, gzr = torch.autograd.grad(out, (z, zr), g)
    want_zr = lowpass_blend_reference(torch.zeros_like(g).double(), g.double(), (6, 5), 0.8, precision=torch.float64)
    assert torch.allclose(gzr.double(), want_zr, atol=1e-5)
    assert torch.allclose(gz.double(), g.double() - want_zr, atol=1e-5)
