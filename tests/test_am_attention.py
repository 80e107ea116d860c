"""am_attention: the torch and C++ CPU backends against the float64 materialised
eq. 7 oracle, special values of lam, layouts, fuzz, validation, dispatch, the
torch.library registration. Triton: tests/test_am_triton.py; memory:
tests/test_am_memory.py."""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerance import assert_matches_oracle

import fam_kernels
from fam_kernels import am
from fam_kernels.dispatch import BackendNotSupportedError
from fam_kernels.reference import am_attention_materialized, nearest_token_index

EXTENSION_EXPECTED = not os.environ.get("FAM_KERNELS_SKIP_BUILD")
BACKENDS = ["torch", "cpu"] if EXTENSION_EXPECTED else ["torch"]

# (lr_size, hr_size): square 2x, square 3x, anisotropic 2x4, odd sizes
GRIDS = [((4, 4), (8, 8)), ((6, 6), (18, 18)), ((4, 8), (8, 32)), ((5, 7), (10, 14))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, heads, lr_size, hr_size, d, dtype=torch.float32):
    N, n = hr_size[0] * hr_size[1], lr_size[0] * lr_size[1]
    hr = [torch.randn(B, heads, N, d).to(dtype) for _ in range(3)]
    lr = [torch.randn(B, heads, n, d).to(dtype) for _ in range(2)]
    return (*hr, *lr)


def check_against_oracle(backend, inputs, lr_size, hr_size, lam=0.7, scale=None):
    kw = dict(lam=lam, hr_size=hr_size, lr_size=lr_size, scale=scale)
    out = fam_kernels.am_attention(*inputs, backend=backend, **kw)
    dtype = inputs[0].dtype
    assert out.dtype == dtype and out.shape == inputs[0].shape
    oracle = am_attention_materialized(*inputs, precision=torch.float64, **kw)
    torch_same_dtype = am_attention_materialized(*inputs, precision=dtype, **kw)
    assert_matches_oracle(out, oracle, torch_same_dtype)


def test_extension_loaded_when_expected():
    if EXTENSION_EXPECTED:
        assert fam_kernels.extension_unavailable_reason() is None
        assert hasattr(torch.ops.fam_C, "am_attention")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [40, 64])
@pytest.mark.parametrize("lr_size,hr_size", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_matches_oracle(backend, dtype, d, lr_size, hr_size):
    B, heads = (2, 3) if d == 40 else (1, 4)
    check_against_oracle(backend, make_inputs(B, heads, lr_size, hr_size, d, dtype), lr_size, hr_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,dtype", [(59, torch.float32), (80, torch.float16), (128, torch.bfloat16),
                                     (128, torch.float32), (8, torch.float32)], ids=str)
def test_other_head_dims(backend, d, dtype):
    lr, hr = (4, 6), (8, 12)
    check_against_oracle(backend, make_inputs(1, 2, lr, hr, d, dtype), lr, hr, lam=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_one_to_one_grid(backend):
    lr = hr = (5, 3)  # s = 1: U is the identity, the op is plain attention on both terms
    check_against_oracle(backend, make_inputs(2, 1, lr, hr, 16), lr, hr, lam=0.5, scale=0.37)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam_zero_is_plain_attention(backend):
    lr, hr = (4, 8), (8, 32)
    q, k, v, q_lr, k_lr = make_inputs(2, 2, lr, hr, 40)
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=0.0, hr_size=hr, lr_size=lr, backend=backend)
    plain = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 40 ** -0.5, -1) @ v.double()
    assert_matches_oracle(out, plain, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam_one_is_upsampled_native_path(backend):
    lr, hr = (5, 7), (10, 14)
    q, k, v, q_lr, k_lr = make_inputs(1, 3, lr, hr, 64)
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=1.0, hr_size=hr, lr_size=lr, backend=backend)
    pooled = torch.nn.functional.avg_pool2d(v.double().transpose(-1, -2).reshape(3, 64, *hr), 2)
    pooled = pooled.reshape(1, 3, 64, -1).transpose(-1, -2)
    native = torch.softmax(q_lr.double() @ k_lr.double().transpose(-1, -2) / 8, -1) @ pooled
    expected = native[:, :, nearest_token_index(hr, lr)]
    assert_matches_oracle(out, expected, floor=1e-5)
    # every high-res child of one native token carries the same row
    assert torch.equal(out[:, :, 0], out[:, :, 1]) and torch.equal(out[:, :, 0], out[:, :, hr[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """q/k/v as diffusers produces them: (B, N, heads, d) transposed; plus a
    non-unit feature stride (every other channel of a wider tensor)."""
    lr, hr = (4, 4), (8, 12)
    B, heads, d = 2, 3, 40
    q, k, v = (torch.randn(B, 96, heads, d).transpose(1, 2) for _ in range(3))
    q_lr = torch.randn(B, 16, heads, 2 * d).transpose(1, 2)[..., ::2]
    k_lr = torch.randn(B, heads, 16, d)
    assert not q.is_contiguous() and q_lr.stride(-1) == 2
    check_against_oracle(backend, (q, k, v, q_lr, k_lr), lr, (8, 12))
    out = fam_kernels.am_attention(q, k, v, q_lr, k_lr, lam=0.7, hr_size=hr, lr_size=lr, backend=backend)
    assert out.stride() == torch.empty_like(q).stride()  # the layout register_fake promises


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backends_agree(dtype):
    if not EXTENSION_EXPECTED:
        pytest.skip("C++ extension deliberately not built (FAM_KERNELS_SKIP_BUILD)")
    lr, hr = (6, 6), (18, 18)
    inputs = make_inputs(2, 2, lr, hr, 64, dtype)
    a = fam_kernels.am_attention(*inputs, lam=0.7, hr_size=hr, lr_size=lr, backend="torch")
    b = fam_kernels.am_attention(*inputs, lam=0.7, hr_size=hr, lr_size=lr, backend="cpu")
    torch.testing.assert_close(a, b, atol=4 * torch.finfo(dtype).eps, rtol=4 * torch.finfo(dtype).eps)


@given(
    lr_h=st.integers(1, 5), lr_w=st.integers(1, 5), s_h=st.integers(1, 3), s_w=st.integers(1, 4),
    d=st.integers(1, 72), heads=st.integers(1, 3), B=st.integers(1, 2), lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2 ** 16),
)
def test_fuzz_against_oracle(lr_h, lr_w, s_h, s_w, d, heads, B, lam, seed):
    torch.manual_seed(seed)
    lr, hr = (lr_h, lr_w), (lr_h * s_h, lr_w * s_w)
    inputs = make_inputs(B, heads, lr, hr, d)
    for backend in BACKENDS:
        check_against_oracle(backend, inputs, lr, hr, lam=lam)


# --------------------------------------------------------------------------- validation

def _good():
    return dict(zip(("q", "k", "v", "q_lr", "k_lr"), make_inputs(1, 2, (2, 3), (4, 6), 8))), \
        dict(lam=0.7, hr_size=(4, 6), lr_size=(2, 3))


def _with(**changes):
    tensors, kw = _good()
    for name, value in changes.items():
        (tensors if name in tensors else kw)[name] = value(tensors) if callable(value) else value
    return tensors, kw


BAD = [
    ("rank", _with(q=lambda t: t["q"][0]), ValueError, "q must be 4-D"),
    ("k shape", _with(k=lambda t: t["k"][:, :1]), ValueError, "k must have q's shape"),
    ("k_lr shape", _with(k_lr=lambda t: t["k_lr"][..., :4]), ValueError, "k_lr must have q_lr's shape"),
    ("heads mismatch", _with(q_lr=lambda t: t["q_lr"][:, :1], k_lr=lambda t: t["k_lr"][:, :1]), ValueError,
     "q_lr must have q's batch, heads and head_dim"),
    ("d mismatch", _with(q_lr=lambda t: t["q_lr"][..., :4], k_lr=lambda t: t["k_lr"][..., :4]), ValueError,
     "head_dim"),
    ("N != H*W", _with(hr_size=(4, 5)), ValueError, "hr_size=4x5 holds 20"),
    ("n != h*w", _with(lr_size=(3, 2), hr_size=(4, 6)), ValueError, "integer multiple"),
    ("lr tokens", _with(lr_size=(2, 2), hr_size=(4, 6)), ValueError, "lr_size=2x2 holds 4"),
    ("lr bigger than hr", _with(q=lambda t: t["q"][:, :, :6], k=lambda t: t["k"][:, :, :6],
                                v=lambda t: t["v"][:, :, :6], hr_size=(1, 6)), ValueError, "integer multiple"),
    ("non-integer sizes", _with(hr_size=(4.0, 6)), TypeError, "hr_size must hold integers"),
    ("zero size", _with(lr_size=(0, 3)), ValueError, "lr_size must be positive"),
    ("lam > 1", _with(lam=1.5), ValueError, r"lam must be in \[0.0, 1.0\]"),
    ("lam < 0", _with(lam=-0.1), ValueError, "lam must be in"),
    ("lam nan", _with(lam=float("nan")), ValueError, "lam must be in"),
    ("lam type", _with(lam="high"), TypeError, "lam must be a real number"),
    ("scale", _with(scale=0.0), ValueError, "scale must be a positive finite"),
    ("dtype mix", _with(v=lambda t: t["v"].half()), TypeError, "v has dtype torch.float16"),
    ("int dtype", _with(q=lambda t: t["q"].int()), TypeError, "q must be float32, float16 or bfloat16"),
    ("meta device", _with(k_lr=lambda t: t["k_lr"].to("meta")), ValueError, "k_lr is on meta"),
    ("not a tensor", _with(k=lambda t: t["k"].numpy()), TypeError, "k must be a torch.Tensor"),
    ("backend name", _with(backend="flash"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("tensors_kw,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_before_work(tensors_kw, exc, match, monkeypatch):
    tensors, kw = tensors_kw
    ran = []
    monkeypatch.setattr(am, "_am_attention_op", lambda *a, **k: ran.append(1))
    with pytest.raises(exc, match=match):
        fam_kernels.am_attention(**tensors, **kw)
    assert not ran


# --------------------------------------------------------------------------- dispatch

def _select(backend=None):
    return am.choose_backend(backend, "cpu", 64)


def test_cpu_default_is_the_fast_kernel(monkeypatch):
    monkeypatch.delenv(am.ENV_VAR, raising=False)
    monkeypatch.delenv("FAM_KERNELS_BACKEND", raising=False)
    assert _select() == ("cpu" if EXTENSION_EXPECTED else "torch")


def test_env_var_and_argument_override(monkeypatch):
    monkeypatch.setenv(am.ENV_VAR, "torch")
    assert _select() == "torch"
    if EXTENSION_EXPECTED:
        assert _select("cpu") == "cpu"  # the argument wins over the environment


def test_explicit_unavailable_backend_is_refused_with_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        _select("triton")
    with pytest.raises(BackendNotSupportedError, match="needs CUDA tensors"):
        _select("cuda")


# --------------------------------------------------------------------------- registration

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    inputs = make_inputs(2, 2, (2, 3), (4, 6), 16)
    torch.library.opcheck(torch.ops.fam_kernels.am_attention.default,
                          (*inputs, 0.7, 4, 6, 2, 3, 0.25, backend))


def test_torch_compile_fullgraph_traces():
    lr, hr = (4, 4), (8, 8)
    inputs = make_inputs(1, 2, lr, hr, 32)

    def layer(q, k, v, q_lr, k_lr):
        return fam_kernels.am_attention(q * 2, k, v, q_lr, k_lr, lam=0.7, hr_size=hr, lr_size=lr) + 1

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), layer(*inputs))
